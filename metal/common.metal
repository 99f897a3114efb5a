// Header shared by the packed binary/ternary kernels: passed verbatim as
// `header=` to mx.fast.metal_kernel (MLX's preamble already brings
// metal_stdlib, `using namespace metal` and bfloat16_t).
// The CUDA twin (bonsai_mlx/kernels.py:metal_to_cuda) reuses everything here
// except the block between the metal-only markers, which it swaps for
// metal/tile_mma.cuh.
#include <metal_simdgroup_matrix>

// Ternary "5 trits per byte": byte = sum_j (t_j + 1) * 3^j. The code of trit j
// is floor(byte / 3^j) mod 3. For byte < 243 the floor equals a multiply by
// ceil(2^16 / 3^j) and a shift (the rounding error stays under 1/81), so
// decoding needs no integer division. Returns the code 0, 1, 2 (t = code - 1).
inline uint bonsai_trit_code(uint byte, uint j) {
  const uint mul = j == 0u ? 65536u : j == 1u ? 21846u : j == 2u ? 7282u : j == 3u ? 2428u : 810u;
  const uint q = (byte * mul) >> 16;
  return q - 3u * ((q * 21846u) >> 16);
}

// @@metal-only-begin
// Threadgroup tiles are float on Metal: the simdgroup matrix functions take
// one element type, and float keeps +-s and bf16/f16 inputs exact.
#define BONSAI_TILE_PAD 8
#define BONSAI_SCRATCH 64
template <typename T>
struct BonsaiTileType {
  typedef float type;
};

// Stages x[m0 .. m0 + BM) x [k0 .. k0 + BK) into the float tile xs (row
// stride ldx), zero past row M.
template <int BM, int BK, int NT, typename T>
void bonsai_stage_x(threadgroup float* xs, int ldx, const device T* x, int m0, int M, int K, int k0, int tid) {
  for (int i = tid; i < BM * BK; i += NT) {
    const int r = i / BK;
    const int c = i % BK;
    xs[r * ldx + c] = m0 + r < M ? static_cast<float>(x[size_t(m0 + r) * K + k0 + c]) : 0.0f;
  }
}

// One simdgroup's WM x WN block of C += A * B with A [WM x bk] (row stride
// lda) and B [bk x WN] (row stride ldb) in threadgroup memory, accumulated in
// 8x8 simdgroup matrices.
template <int WM, int WN>
struct BonsaiSimdTile {
  simdgroup_matrix<float, 8, 8> c[WM / 8][WN / 8];

  void zero() {
    for (int i = 0; i < WM / 8; ++i)
      for (int j = 0; j < WN / 8; ++j)
        c[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  void mma(const threadgroup float* a, int lda, const threadgroup float* b, int ldb, int bk) {
    for (int kk = 0; kk < bk; kk += 8) {
      simdgroup_matrix<float, 8, 8> am[WM / 8];
      simdgroup_matrix<float, 8, 8> bm[WN / 8];
      for (int i = 0; i < WM / 8; ++i)
        simdgroup_load(am[i], a + i * 8 * lda + kk, lda);
      for (int j = 0; j < WN / 8; ++j)
        simdgroup_load(bm[j], b + kk * ldb + j * 8, ldb);
      for (int i = 0; i < WM / 8; ++i)
        for (int j = 0; j < WN / 8; ++j)
          simdgroup_multiply_accumulate(c[i][j], am[i], bm[j], c[i][j]);
    }
  }

  // Writes the block to y[row0.., col0..] (row stride ldy), skipping rows >=
  // rows and columns >= cols, through this simdgroup's 8x8 float scratch.
  template <typename T>
  void store(device T* y, int ldy, int row0, int col0, int rows, int cols,
             threadgroup float* scratch, uint lane) {
    for (int i = 0; i < WM / 8; ++i)
      for (int j = 0; j < WN / 8; ++j) {
        simdgroup_store(c[i][j], scratch, 8);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (int e = int(lane); e < 64; e += 32) {
          const int r = row0 + i * 8 + e / 8;
          const int col = col0 + j * 8 + e % 8;
          if (r < rows && col < cols)
            y[size_t(r) * ldy + col] = static_cast<T>(scratch[e]);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
      }
  }
};
// @@metal-only-end
