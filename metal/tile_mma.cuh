// CUDA twin of the metal-only block of metal/common.metal, appended to the
// generated CUDA header by bonsai_mlx/kernels.py:metal_to_cuda. Hand-written:
// Metal's 8x8 simdgroup_matrix ops have no one-to-one tensor-core
// instruction, so this keeps the same contract (BonsaiTileType,
// bonsai_stage_x, BonsaiSimdTile<WM, WN>::zero/mma/store, BONSAI_TILE_PAD,
// BONSAI_SCRATCH)
// on 16x16x16 wmma fragments instead. Lockstep is tested: the same names by
// tests/test_kernels.py, the same outputs as the reference on the GPU by
// tests/test_kernels_cuda.py.
#include <mma.h>

#define BONSAI_TILE_PAD 8
#define BONSAI_SCRATCH 256

// Tiles stay in the input type (__half or __nv_bfloat16) for the tensor cores.
// float inputs never reach the CUDA GEMM (the launcher routes them to GEMV).
template <typename T>
struct BonsaiTileType {
  typedef T type;
};

// Stages x[m0 .. m0 + BM) x [k0 .. k0 + BK) into xs (row stride ldx), zero
// past row M: 16-byte copies when x is 16-byte aligned (tiles are the input
// type here, so no conversion), element copies otherwise.
template <int BM, int BK, int NT, typename T>
__device__ __forceinline__ void bonsai_stage_x(T* xs, int ldx, const T* x, int m0, int M, int K, int k0, int tid) {
  static_assert(sizeof(T) == 2 && BK % 8 == 0 && (BM * BK / 8) % NT == 0, "vector staging layout");
  if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
#pragma unroll
    for (int it = 0; it < BM * BK / 8 / NT; ++it) {
      const int i = tid + it * NT;
      const int r = i / (BK / 8);
      const int c = (i % (BK / 8)) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (m0 + r < M) v = *reinterpret_cast<const uint4*>(x + size_t(m0 + r) * K + k0 + c);
      *reinterpret_cast<uint4*>(xs + r * ldx + c) = v;
    }
  } else {
    for (int i = tid; i < BM * BK; i += NT) {
      const int r = i / BK;
      const int c = i % BK;
      xs[r * ldx + c] = m0 + r < M ? x[size_t(m0 + r) * K + k0 + c] : static_cast<T>(0.0f);
    }
  }
}

template <int WM, int WN>
struct BonsaiSimdTile {
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16x16");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[WM / 16][WN / 16];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < WM / 16; ++i)
#pragma unroll
      for (int j = 0; j < WN / 16; ++j)
        nvcuda::wmma::fill_fragment(c[i][j], 0.0f);
  }

  template <typename TT>
  __device__ void mma(const TT* a, int lda, const TT* b, int ldb, int bk) {
    using namespace nvcuda;
#pragma unroll
    for (int kk = 0; kk < bk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TT, wmma::row_major> am[WM / 16];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, TT, wmma::row_major> bm[WN / 16];
#pragma unroll
      for (int i = 0; i < WM / 16; ++i)
        wmma::load_matrix_sync(am[i], a + i * 16 * lda + kk, lda);
#pragma unroll
      for (int j = 0; j < WN / 16; ++j)
        wmma::load_matrix_sync(bm[j], b + kk * ldb + j * 16, ldb);
#pragma unroll
      for (int i = 0; i < WM / 16; ++i)
#pragma unroll
        for (int j = 0; j < WN / 16; ++j)
          wmma::mma_sync(c[i][j], am[i], bm[j], c[i][j]);
    }
  }

  template <typename T>
  __device__ void store(T* y, int ldy, int row0, int col0, int rows, int cols, float* scratch, uint lane) {
#pragma unroll
    for (int i = 0; i < WM / 16; ++i)
#pragma unroll
      for (int j = 0; j < WN / 16; ++j) {
        nvcuda::wmma::store_matrix_sync(scratch, c[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        for (int e = int(lane); e < 256; e += 32) {
          const int r = row0 + i * 16 + e / 16;
          const int col = col0 + j * 16 + e % 16;
          if (r < rows && col < cols)
            y[size_t(r) * ldy + col] = static_cast<T>(scratch[e]);
        }
        __syncwarp();
      }
  }
};
