// CUDA twin of the metal-only block of metal/common.metal, appended to the
// generated CUDA header by bonsai_mlx/kernels.py:metal_to_cuda. Hand-written:
// Metal's 8x8 simdgroup_matrix ops have no one-to-one tensor-core
// instruction, so this keeps the same contract (BonsaiTileType,
// bonsai_stage_x, bonsai_stage_commit, bonsai_stage_wait,
// bonsai_tile_scratch, BonsaiSimdTile<WM, WN>::zero/mma_binary/mma_ternary/
// store, BONSAI_TILE_PAD) on mma.sync m16n8k16 fragments instead: x comes
// from shared memory through ldmatrix, and W's B fragments are decoded from
// the staged bit planes straight into registers (the Metal side decodes the
// same planes into the simdgroup's scratch, since simdgroup matrices load
// from memory). Lockstep is tested: the same names by tests/test_kernels.py,
// the same outputs as the reference on the GPU by tests/test_kernels_cuda.py.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define BONSAI_TILE_PAD 8

// Tiles stay in the input type (__half or __nv_bfloat16) for the tensor cores.
// float inputs never reach the CUDA GEMM (the launcher routes them to GEMV).
template <typename T>
struct BonsaiTileType {
  typedef T type;
};

__device__ __forceinline__ unsigned bonsai_smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Stages x[m0 .. m0 + BM) x [k0 .. k0 + BK) into xs (row stride ldx), zero
// past row M: 16-byte cp.async copies (zero-filled rows past M) when x is
// 16-byte aligned, element copies otherwise. Completes at bonsai_stage_wait.
template <int BM, int BK, int NT, typename T>
__device__ __forceinline__ void bonsai_stage_x(T* xs, int ldx, const T* x, int m0, int M, int K, int k0, int tid) {
  static_assert(sizeof(T) == 2 && BK % 8 == 0 && (BM * BK / 8) % NT == 0, "vector staging layout");
  if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
#pragma unroll
    for (int it = 0; it < BM * BK / 8 / NT; ++it) {
      const int i = tid + it * NT;
      const int r = i / (BK / 8);
      const int c = (i % (BK / 8)) * 8;
      const bool ok = m0 + r < M;
      const T* src = x + size_t(ok ? m0 + r : 0) * K + k0 + c;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(bonsai_smem_addr(xs + r * ldx + c)),
                   "l"(src), "r"(ok ? 16 : 0));
    }
  } else {
    for (int i = tid; i < BM * BK; i += NT) {
      const int r = i / BK;
      const int c = i % BK;
      xs[r * ldx + c] = m0 + r < M ? x[size_t(m0 + r) * K + k0 + c] : static_cast<T>(0.0f);
    }
  }
}
__device__ __forceinline__ void bonsai_stage_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bonsai_stage_wait() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// The 8 bytes of a 5-trits-per-byte row (KB bytes) from byte b0 as lo/hi
// (121 = five zero trits past the row or when !ok): three aligned 4-byte
// loads and a funnel shift when 12 bytes from b0 lie inside the row (the
// aligned-down start is at most 3 bytes earlier, inside the same array),
// byte loads otherwise.
__device__ __forceinline__ void bonsai_load_trit_bytes(const uint8_t* row, int b0, int KB, bool ok, uint& lo,
                                                       uint& hi) {
  if (ok && b0 + 12 <= KB) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(row + b0);
    const uint* p = reinterpret_cast<const uint*>(a & ~uintptr_t(3));
    const uint w0 = p[0];
    const uint w1 = p[1];
    const uint w2 = p[2];
    const uint sh = uint(a & 3u) * 8u;
    lo = __funnelshift_r(w0, w1, sh);
    hi = __funnelshift_r(w1, w2, sh);
  } else {
    uint v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (ok && b0 + j < KB) ? uint(row[b0 + j]) : 121u;
    lo = v[0] | (v[1] << 8u) | (v[2] << 16u) | (v[3] << 24u);
    hi = v[4] | (v[5] << 8u) | (v[6] << 16u) | (v[7] << 24u);
  }
}

// Nothing goes through scratch on CUDA (fragments are decoded and stored from
// registers); one float keeps the array declaration legal.
template <int WM, int WN>
__host__ __device__ constexpr int bonsai_tile_scratch() {
  return 1;
}

// -s as a pair of the tile type, raw bits (low half = lower k).
__device__ __forceinline__ uint bonsai_neg_pair(float s, __half) {
  __half2 h = __float2half2_rn(-s);
  return *reinterpret_cast<uint*>(&h);
}
__device__ __forceinline__ uint bonsai_neg_pair(float s, __nv_bfloat16) {
  __nv_bfloat162 h = __float2bfloat162_rn(-s);
  return *reinterpret_cast<uint*>(&h);
}

__device__ __forceinline__ void bonsai_mma16816(float* c, const uint* a, const uint* b, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void bonsai_mma16816(float* c, const uint* a, const uint* b, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void bonsai_store2(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void bonsai_store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

template <int WM, int WN>
struct BonsaiSimdTile {
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of 16x8");
  static constexpr int MI = WM / 16;
  static constexpr int NJ = WN / 8;
  float c[MI][NJ][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
  }

  // Lane (g, q) = (lane / 4, lane % 4) holds B[k][n] for n = 8j + g and
  // k = 2q, 2q+1 (b0) and 2q+8, 2q+9 (b1) of each 16-deep k-step. In fragment
  // bit order (bonsai_plane_order) those pairs of plane word kk / 32 sit at
  // bits (p, p + 16) for p = 8 (kk % 32 / 16) + q (b0) and p + 4 (b1): one shift
  // brings them to the sign bits 15 and 31, where a set bit turns -s into +s;
  // ternary zeroes a half whose non-zero bit is clear (prmt sign-replicates).
  template <bool TER, typename TT>
  __device__ __forceinline__ void mma_planes(const TT* a, int lda, const uint* wp, const uint* wz, int ldw,
                                             const float* sc, int bk, uint lane, float*) {
    const int g = int(lane) >> 2;
    const int q = int(lane) & 3;
    uint ns[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) ns[j] = bonsai_neg_pair(sc[j * 8 + g], TT());
    const TT* arow = a + (int(lane) & 15) * lda + (int(lane) >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < bk; kk += 16) {
      uint af[MI][4];
#pragma unroll
      for (int i = 0; i < MI; ++i)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(af[i][0]), "=r"(af[i][1]), "=r"(af[i][2]), "=r"(af[i][3])
                     : "r"(bonsai_smem_addr(arow + i * 16 * lda + kk)));
      const int s0 = 15 - ((kk & 16) >> 1) - q;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const uint v = wp[(kk >> 5) * ldw + j * 8 + g];
        uint b[2];
        b[0] = ns[j] ^ ((v << s0) & 0x80008000u);
        b[1] = ns[j] ^ ((v << (s0 - 4)) & 0x80008000u);
        if (TER) {
          const uint z = wz[(kk >> 5) * ldw + j * 8 + g];
          uint m0;
          uint m1;
          asm("prmt.b32 %0, %1, 0, 0xBB99;\n" : "=r"(m0) : "r"(z << s0));
          asm("prmt.b32 %0, %1, 0, 0xBB99;\n" : "=r"(m1) : "r"(z << (s0 - 4)));
          b[0] &= m0;
          b[1] &= m1;
        }
#pragma unroll
        for (int i = 0; i < MI; ++i) bonsai_mma16816(c[i][j], af[i], b, TT());
      }
    }
  }

  template <typename TT>
  __device__ __forceinline__ void mma_binary(const TT* a, int lda, const uint* wp, int ldw, const float* sc, int bk,
                                             uint lane, float* scratch) {
    mma_planes<false>(a, lda, wp, wp, ldw, sc, bk, lane, scratch);
  }

  template <typename TT>
  __device__ __forceinline__ void mma_ternary(const TT* a, int lda, const uint* wp, const uint* wz, int ldw,
                                              const float* sc, int bk, uint lane, float* scratch) {
    mma_planes<true>(a, lda, wp, wz, ldw, sc, bk, lane, scratch);
  }

  // Accumulator (i, j, e): row 16i + g + 8 (e / 2), column 8j + 2q + e % 2.
  template <typename T>
  __device__ __forceinline__ void store(T* y, int ldy, int row0, int col0, int rows, int cols, float*, uint lane) {
    const int g = int(lane) >> 2;
    const int q = int(lane) & 3;
    const bool pairs = (ldy % 2) == 0 && (reinterpret_cast<uintptr_t>(y) & 3) == 0;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + i * 16 + g + 8 * h;
          const int col = col0 + j * 8 + 2 * q;
          if (r >= rows) continue;
          T* p = y + size_t(r) * ldy + col;
          if (pairs && col + 1 < cols) {
            bonsai_store2(p, c[i][j][2 * h], c[i][j][2 * h + 1]);
          } else {
            if (col < cols) p[0] = static_cast<T>(c[i][j][2 * h]);
            if (col + 1 < cols) p[1] = static_cast<T>(c[i][j][2 * h + 1]);
          }
        }
  }
};

// Skinny path (M < 32, 16-bit x): the twin of the Metal BonsaiSkinnyTile.
// Lane (g, q) owns k = kb + 32 (KL q + l) .. + 31 of weight row 8j + g. The
// mma's k order is free, so its 16 slots per step are dealt out as: lane
// quad q, step (l, t) puts x[.][k0 + 4t + {0, 1}] in slots 2q, 2q+1 and
// x[.][k0 + 4t + {2, 3}] in slots 2q+8, 2q+9 (k0 = kb + 32 (KL q + l)), which
// is one 8-byte load of x per row from device memory, and the matching bits
// 4t .. 4t+3 of the lane's own word sit, in fragment bit order, at (2t, 2t+16)
// and (2t+1, 2t+17): one shift each. No shared memory.
template <int NJ, int KL>
__host__ __device__ constexpr int bonsai_skinny_scratch() {
  return 1;
}

template <typename T>
__device__ __forceinline__ void bonsai_ld_x4(const T* p, bool ok, bool aligned, uint& lo, uint& hi) {
  lo = 0u;
  hi = 0u;
  if (!ok) return;
  if (aligned) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    lo = v.x;
    hi = v.y;
  } else {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    lo = uint(h[0]) | (uint(h[1]) << 16);
    hi = uint(h[2]) | (uint(h[3]) << 16);
  }
}

template <int NJ, int KL>
struct BonsaiSkinnyTile {
  float c[NJ][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[j][e] = 0.0f;
  }

  template <bool TER, typename T>
  __device__ __forceinline__ void mma_words_planes(const T* x, int K, int m0, int M, int kb, const uint* wv,
                                                   const uint* wz, const float* s, uint lane, float*) {
    const int g = int(lane) >> 2;
    const int q = int(lane) & 3;
    const int kq = kb + 32 * KL * q;
    const bool ok0 = kq < K && m0 + g < M;
    const bool ok1 = kq < K && m0 + g + 8 < M;
    const bool aligned = (reinterpret_cast<uintptr_t>(x) & 7) == 0;
    const T* x0 = x + size_t(ok0 ? m0 + g : 0) * K + (kq < K ? kq : 0);
    const T* x1 = x + size_t(ok1 ? m0 + g + 8 : 0) * K + (kq < K ? kq : 0);
    uint ns[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) ns[j] = bonsai_neg_pair(s[j], T());
#pragma unroll
    for (int l = 0; l < KL; ++l) {
      uint a[8][4];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        bonsai_ld_x4(x0 + 32 * l + 4 * t, ok0, aligned, a[t][0], a[t][2]);
        bonsai_ld_x4(x1 + 32 * l + 4 * t, ok1, aligned, a[t][1], a[t][3]);
      }
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const uint v = wv[j * KL + l];
          uint b[2];
          b[0] = ns[j] ^ ((v << (15 - 2 * t)) & 0x80008000u);
          b[1] = ns[j] ^ ((v << (14 - 2 * t)) & 0x80008000u);
          if (TER) {
            const uint z = wz[j * KL + l];
            uint m0_;
            uint m1_;
            asm("prmt.b32 %0, %1, 0, 0xBB99;\n" : "=r"(m0_) : "r"(z << (15 - 2 * t)));
            asm("prmt.b32 %0, %1, 0, 0xBB99;\n" : "=r"(m1_) : "r"(z << (14 - 2 * t)));
            b[0] &= m0_;
            b[1] &= m1_;
          }
          bonsai_mma16816(c[j], a[t], b, T());
        }
    }
  }

  template <typename T>
  __device__ __forceinline__ void mma_binary(const T* x, int K, int m0, int M, int kb, const uint* wv, const float* s,
                                             uint lane, float* scratch) {
    mma_words_planes<false>(x, K, m0, M, kb, wv, wv, s, lane, scratch);
  }

  template <typename T>
  __device__ __forceinline__ void mma_ternary(const T* x, int K, int m0, int M, int kb, const uint* wv, const uint* wz,
                                              const float* s, uint lane, float* scratch) {
    mma_words_planes<true>(x, K, m0, M, kb, wv, wz, s, lane, scratch);
  }

  // Accumulator (j, e): row g + 8 (e / 2), column 8j + 2q + e % 2.
  __device__ __forceinline__ void store_partial(float* red, int ldr, uint lane) {
    const int g = int(lane) >> 2;
    const int q = int(lane) & 3;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      red[g * ldr + 8 * j + 2 * q] = c[j][0];
      red[g * ldr + 8 * j + 2 * q + 1] = c[j][1];
      red[(g + 8) * ldr + 8 * j + 2 * q] = c[j][2];
      red[(g + 8) * ldr + 8 * j + 2 * q + 1] = c[j][3];
    }
  }
};
