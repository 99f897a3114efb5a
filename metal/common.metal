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

// Bit order of the staged bit planes ("fragment order"): bit 2i of a packed
// 32-k word goes to bit i, bit 2i+1 to bit 16 + i. Then the two weights that
// share a 32-bit tensor-core register (k, k+1) sit 16 bits apart, and one
// shift plus one mask puts both signs in place (CUDA twin). The Metal decode
// reads the same planes at the same positions (bonsai_plane_bit).
inline uint bonsai_plane_order(uint v) {
  v = ((v >> 1u) & 0x22222222u) | ((v << 1u) & 0x44444444u) | (v & 0x99999999u);
  v = ((v >> 2u) & 0x0C0C0C0Cu) | ((v << 2u) & 0x30303030u) | (v & 0xC3C3C3C3u);
  v = ((v >> 4u) & 0x00F000F0u) | ((v << 4u) & 0x0F000F00u) | (v & 0xF00FF00Fu);
  v = ((v >> 8u) & 0x0000FF00u) | ((v << 8u) & 0x00FF0000u) | (v & 0xFF0000FFu);
  return v;
}
// Where element k % 32 of a word sits in its plane word.
inline uint bonsai_plane_bit(uint k) {
  return ((k & 1u) << 4u) | ((k & 31u) >> 1u);
}

// KL consecutive packed words from p (16-byte aligned when KL == 4: rows are
// K/32 words with K % 128 == 0), or zeros when !ok.
template <int KL>
inline void bonsai_load_words(const device uint* p, bool ok, thread uint* out) {
  if (KL == 4) {
    uint4 v = {0u, 0u, 0u, 0u};
    if (ok)
      v = *reinterpret_cast<const device uint4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    for (int l = 0; l < KL; ++l)
      out[l] = ok ? p[l] : 0u;
  }
}

// A 256-entry table, byte -> its 5 trits as two bit planes: bits 0-4 set where
// t = +1, bits 5-9 set where t != 0 (codes >= 243 never occur; they map to 0).
inline uint bonsai_trit_lut_entry(uint byte) {
  uint pos = 0u;
  uint nz = 0u;
  for (uint j = 0u; j < 5u; ++j) {
    const uint code = bonsai_trit_code(byte, j);
    pos |= (code == 2u ? 1u : 0u) << j;
    nz |= (code != 1u ? 1u : 0u) << j;
  }
  return byte < 243u ? (pos | (nz << 5u)) : 0u;
}

// 32 trits as bit planes (bit i: trit i is +1 / is non-zero), from the 8 bytes
// lo (bytes 0-3) and hi (bytes 4-7) that start r (0..4) trits before them.
// 8 table reads instead of 32 divisions.
inline void bonsai_trit_planes(uint lo, uint hi, uint r, const threadgroup uint* lut, thread uint& pos,
                               thread uint& nz) {
  uint p0 = 0u;
  uint z0 = 0u;
  for (uint i = 0u; i < 6u; ++i) {
    const uint e = lut[((i < 4u ? lo : hi) >> (8u * (i & 3u))) & 255u];
    p0 |= (e & 31u) << (5u * i);
    z0 |= (e >> 5u) << (5u * i);
  }
  const uint e6 = lut[(hi >> 16u) & 255u];
  const uint e7 = lut[hi >> 24u];
  const uint p1 = (e6 & 31u) | ((e7 & 31u) << 5u);
  const uint z1 = (e6 >> 5u) | ((e7 >> 5u) << 5u);
  pos = (p0 >> r) | (p1 << (30u - r));
  nz = (z0 >> r) | (z1 << (30u - r));
}

// @@metal-only-begin
// Threadgroup tiles are float on Metal: the simdgroup matrix functions take
// one element type, and float keeps +-s and bf16/f16 inputs exact.
#define BONSAI_TILE_PAD 8

template <typename T>
struct BonsaiTileType {
  typedef float type;
};

// Stages x[m0 .. m0 + BM) x [k0 .. k0 + BK) into the float tile xs (row
// stride ldx), zero past row M. Synchronous on Metal (the CUDA twin issues
// asynchronous copies); bonsai_stage_commit / bonsai_stage_wait bracket it.
template <int BM, int BK, int NT, typename T>
void bonsai_stage_x(threadgroup float* xs, int ldx, const device T* x, int m0, int M, int K, int k0, int tid) {
  for (int i = tid; i < BM * BK; i += NT) {
    const int r = i / BK;
    const int c = i % BK;
    xs[r * ldx + c] = m0 + r < M ? static_cast<float>(x[size_t(m0 + r) * K + k0 + c]) : 0.0f;
  }
}
inline void bonsai_stage_commit() {}
inline void bonsai_stage_wait() {}

// The 8 bytes of a 5-trits-per-byte row (KB bytes) starting at byte b0, as
// lo = bytes 0-3 and hi = bytes 4-7; 121 (five zero trits) past the row or
// when !ok. Byte loads here (rows are not word aligned); the CUDA twin reads
// three aligned words and funnel-shifts when the row has room.
inline void bonsai_load_trit_bytes(const device uint8_t* row, int b0, int KB, bool ok, thread uint& lo,
                                   thread uint& hi) {
  uint v[8];
  for (int j = 0; j < 8; ++j)
    v[j] = (ok && b0 + j < KB) ? uint(row[b0 + j]) : 121u;
  lo = v[0] | (v[1] << 8u) | (v[2] << 16u) | (v[3] << 24u);
  hi = v[4] | (v[5] << 8u) | (v[6] << 16u) | (v[7] << 24u);
}

// Floats of threadgroup scratch one simdgroup's tile needs: an 8 x WN strip
// of decoded weights per 8-deep k-step (and an 8x8 block for the store).
template <int WM, int WN>
constexpr int bonsai_tile_scratch() {
  return 8 * WN > 64 ? 8 * WN : 64;
}

// One simdgroup's WM x WN block of C += A * B, accumulated in 8x8 simdgroup
// matrices. A [WM x bk] is x in threadgroup memory (row stride lda). B = W^T
// [bk x WN] is never stored dense: it is decoded by this simdgroup from the
// packed bit planes staged for the k-step (wp: bit bonsai_plane_bit(k) of word
// (k/32)*ldw + n is 1 for +s; wz, ternary only: 1 for non-zero) and the per-column scales sc,
// 8 k at a time into its own scratch, right before the multiply (the CUDA
// twin decodes the same planes straight into mma fragments).
template <int WM, int WN>
struct BonsaiSimdTile {
  simdgroup_matrix<float, 8, 8> c[WM / 8][WN / 8];

  void zero() {
    for (int i = 0; i < WM / 8; ++i)
      for (int j = 0; j < WN / 8; ++j)
        c[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  template <bool TER>
  void mma_planes(const threadgroup float* a, int lda, const threadgroup uint* wp, const threadgroup uint* wz, int ldw,
                  const threadgroup float* sc, int bk, uint lane, threadgroup float* scratch) {
    for (int kk = 0; kk < bk; kk += 8) {
      for (int e = int(lane); e < 8 * WN; e += 32) {
        const int k = kk + e / WN;
        const int n = e % WN;
        const uint sh = bonsai_plane_bit(uint(k));
        float v = ((wp[(k / 32) * ldw + n] >> sh) & 1u) ? sc[n] : -sc[n];
        if (TER)
          v = ((wz[(k / 32) * ldw + n] >> sh) & 1u) ? v : 0.0f;
        scratch[e] = v;
      }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      simdgroup_matrix<float, 8, 8> am[WM / 8];
      simdgroup_matrix<float, 8, 8> bm[WN / 8];
      for (int i = 0; i < WM / 8; ++i)
        simdgroup_load(am[i], a + i * 8 * lda + kk, lda);
      for (int j = 0; j < WN / 8; ++j)
        simdgroup_load(bm[j], scratch + j * 8, WN);
      simdgroup_barrier(mem_flags::mem_threadgroup);  // scratch is rewritten next k-step
      for (int i = 0; i < WM / 8; ++i)
        for (int j = 0; j < WN / 8; ++j)
          simdgroup_multiply_accumulate(c[i][j], am[i], bm[j], c[i][j]);
    }
  }

  void mma_binary(const threadgroup float* a, int lda, const threadgroup uint* wp, int ldw, const threadgroup float* sc,
                  int bk, uint lane, threadgroup float* scratch) {
    mma_planes<false>(a, lda, wp, wp, ldw, sc, bk, lane, scratch);
  }

  void mma_ternary(const threadgroup float* a, int lda, const threadgroup uint* wp, const threadgroup uint* wz, int ldw,
                   const threadgroup float* sc, int bk, uint lane, threadgroup float* scratch) {
    mma_planes<true>(a, lda, wp, wz, ldw, sc, bk, lane, scratch);
  }

  // Writes the block to y[row0.., col0..] (row stride ldy), skipping rows >=
  // rows and columns >= cols, through this simdgroup's scratch.
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

// Skinny path (M < 32, 16-bit x): one simdgroup's 16 x (8 NJ) block of
// y = x W^T over its k-steps of 128 KL. Lane (g, q) = (lane / 4, lane % 4)
// holds KL packed words of weight row 8j + g (wv[j * KL + l], fragment bit
// order, with wz the non-zero planes for ternary) for k = kb + 32 (KL q + l)
// .. + 31, and that k-range's scale s[j]. x rows m0 .. m0 + 15 (zero past M)
// and the decoded weights go through this simdgroup's scratch, since
// simdgroup matrices load from memory; the CUDA twin feeds the same words
// straight into mma fragments and x from device memory.
template <int NJ, int KL>
constexpr int bonsai_skinny_scratch() {
  return 16 * 128 * KL + 128 * KL * 8;
}

template <int NJ, int KL>
struct BonsaiSkinnyTile {
  simdgroup_matrix<float, 8, 8> c[2][NJ];

  void zero() {
    for (int r = 0; r < 2; ++r)
      for (int j = 0; j < NJ; ++j)
        c[r][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  template <bool TER, typename T>
  void mma_words_planes(const device T* x, int K, int m0, int M, int kb, const thread uint* wv, const thread uint* wz,
                        const thread float* s, uint lane, threadgroup float* scratch) {
    constexpr int KI = 128 * KL;
    threadgroup float* xa = scratch;           // [16][KI]
    threadgroup float* wb = scratch + 16 * KI;  // [KI][8]
    for (int e = int(lane); e < 16 * KI; e += 32) {
      const int r = e / KI;
      const int k = kb + e % KI;
      xa[e] = (m0 + r < M && k < K) ? static_cast<float>(x[size_t(m0 + r) * K + k]) : 0.0f;
    }
    const int g = int(lane) / 4;
    const int q = int(lane) % 4;
    for (int j = 0; j < NJ; ++j) {
      simdgroup_barrier(mem_flags::mem_threadgroup);  // xa written; wb free again
      for (int l = 0; l < KL; ++l)
        for (int i = 0; i < 32; ++i) {
          const uint sh = bonsai_plane_bit(uint(i));
          float v = ((wv[j * KL + l] >> sh) & 1u) ? s[j] : -s[j];
          if (TER)
            v = ((wz[j * KL + l] >> sh) & 1u) ? v : 0.0f;
          wb[(32 * (KL * q + l) + i) * 8 + g] = v;
        }
      simdgroup_barrier(mem_flags::mem_threadgroup);
      for (int kk = 0; kk < KI; kk += 8) {
        simdgroup_matrix<float, 8, 8> a0;
        simdgroup_matrix<float, 8, 8> a1;
        simdgroup_matrix<float, 8, 8> b;
        simdgroup_load(a0, xa + kk, KI);
        simdgroup_load(a1, xa + 8 * KI + kk, KI);
        simdgroup_load(b, wb + kk * 8, 8);
        simdgroup_multiply_accumulate(c[0][j], a0, b, c[0][j]);
        simdgroup_multiply_accumulate(c[1][j], a1, b, c[1][j]);
      }
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);  // scratch is rewritten by the next step
  }

  template <typename T>
  void mma_binary(const device T* x, int K, int m0, int M, int kb, const thread uint* wv, const thread float* s,
                  uint lane, threadgroup float* scratch) {
    mma_words_planes<false>(x, K, m0, M, kb, wv, wv, s, lane, scratch);
  }

  template <typename T>
  void mma_ternary(const device T* x, int K, int m0, int M, int kb, const thread uint* wv, const thread uint* wz,
                   const thread float* s, uint lane, threadgroup float* scratch) {
    mma_words_planes<true>(x, K, m0, M, kb, wv, wz, s, lane, scratch);
  }

  // The block as red[m][n] (row stride ldr) in threadgroup memory.
  void store_partial(threadgroup float* red, int ldr, uint lane) {
    for (int r = 0; r < 2; ++r)
      for (int j = 0; j < NJ; ++j)
        simdgroup_store(c[r][j], red + r * 8 * ldr + j * 8, ldr);
  }
};
// @@metal-only-end
