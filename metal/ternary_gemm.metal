// Tiled GEMM (M >= 32): y[M, N] = x[M, K] @ W[N, K]^T, W ternary, 5 trits per
// byte: w uint8 [N, ceil(K/5)], byte i = sum_j (t[5i+j] + 1) * 3^j,
// scales [N, K/128]. Template: T (x, y dtype), BM x BN tile per threadgroup,
// BK (32 or 64) k per step, SGM x SGN simdgroups (each a WM x WN block).
// Same two-stage pipeline as binary_gemm: the 5-trit bytes of step s+1 are
// loaded into registers before step s's multiply and turned into two bit
// planes per 32 trits (+1 / non-zero, through a 256-entry byte table; fragment
// bit order) after
// it; each simdgroup decodes its B block from those planes right before its
// multiply-accumulates (BonsaiSimdTile::mma_ternary). W is never dense in
// threadgroup memory.
typedef typename BonsaiTileType<T>::type TileT;
constexpr int NT = 32 * SGM * SGN;
constexpr int WM = BM / SGM;
constexpr int WN = BN / SGN;
constexpr int LDX = BK + BONSAI_TILE_PAD;  // x tile [BM][LDX], k fastest
constexpr int KWS = BK / 32;               // 32-trit plane words per weight row per k-step
constexpr int WPT = (BN * KWS + NT - 1) / NT;  // plane words each thread builds per k-step
constexpr int SPT = (BN + NT - 1) / NT;    // scales each thread stages per k-step
constexpr int SCR = bonsai_tile_scratch<WM, WN>();
static_assert(BK % 32 == 0 && 128 % BK == 0, "a k-step is whole words inside one scale group");
threadgroup TileT xs[2 * BM * LDX];
threadgroup uint wp[2 * KWS * BN];  // [buffer][word of the step][row]: +1 bits
threadgroup uint wz[2 * KWS * BN];  // non-zero bits
threadgroup float wsc[2 * BN];
threadgroup uint lut[256];
threadgroup float scratch[SGM * SGN * SCR];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KB = w_shape[1];  // ceil(K / 5) bytes per weight row
const int KG = K / 128;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const uint lane = thread_index_in_simdgroup;
const int n0 = int(threadgroup_position_in_grid.x) * BN;
const int m0 = int(threadgroup_position_in_grid.y) * BM;
const int steps = K / BK;

for (int i = tid; i < 256; i += NT)
  lut[i] = bonsai_trit_lut_entry(uint(i));

// The 8 bytes holding trits k .. k+31 of the plane word (row, word) = (i / KWS,
// i % KWS) for i = tid + t * NT: lo = bytes 0-3, hi = 4-7 (121 = five zero
// trits past the row or for rows >= N), starting k - 5 * (k / 5) trits early.
uint blo[WPT];
uint bhi[WPT];
float sreg[SPT];
for (int t = 0; t < WPT; ++t) {
  const int i = tid + t * NT;
  const int n = i < BN * KWS ? n0 + i / KWS : N;
  bonsai_load_trit_bytes(w + size_t(n < N ? n : 0) * KB, (32 * (i % KWS)) / 5, KB, n < N, blo[t], bhi[t]);
}
bonsai_stage_x<BM, BK, NT>(xs, LDX, x, m0, M, K, 0, tid);
bonsai_stage_commit();
for (int t = 0; t < SPT; ++t) {
  const int r = tid + t * NT;
  if (r < BN)
    wsc[r] = n0 + r < N ? static_cast<float>(scales[size_t(n0 + r) * KG]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // lut
for (int t = 0; t < WPT; ++t) {
  const int i = tid + t * NT;
  const int k = 32 * (i % KWS);
  uint p;
  uint z;
  bonsai_trit_planes(blo[t], bhi[t], uint(k - 5 * (k / 5)), lut, p, z);
  if (i < BN * KWS) {
    wp[(i % KWS) * BN + i / KWS] = bonsai_plane_order(p);
    wz[(i % KWS) * BN + i / KWS] = bonsai_plane_order(z);
  }
}

BonsaiSimdTile<WM, WN> acc;
acc.zero();
for (int s = 0; s < steps; ++s) {
  const int buf = s % 2;
  bonsai_stage_wait();
  // Step s is staged; every simdgroup is done with step s - 1's buffer.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const bool more = s + 1 < steps;
  const int k1 = (s + 1) * BK;
  if (more) {
    bonsai_stage_x<BM, BK, NT>(xs + (1 - buf) * BM * LDX, LDX, x, m0, M, K, k1, tid);
    bonsai_stage_commit();
    for (int t = 0; t < WPT; ++t) {
      const int i = tid + t * NT;
      const int n = i < BN * KWS ? n0 + i / KWS : N;
      bonsai_load_trit_bytes(w + size_t(n < N ? n : 0) * KB, (k1 + 32 * (i % KWS)) / 5, KB, n < N, blo[t], bhi[t]);
    }
    for (int t = 0; t < SPT; ++t) {
      const int r = tid + t * NT;
      sreg[t] = (r < BN && n0 + r < N) ? static_cast<float>(scales[size_t(n0 + r) * KG + k1 / 128]) : 0.0f;
    }
  }
  acc.mma_ternary(xs + buf * BM * LDX + (sg / SGN) * WM * LDX, LDX, wp + buf * KWS * BN + (sg % SGN) * WN,
                  wz + buf * KWS * BN + (sg % SGN) * WN, BN, wsc + buf * BN + (sg % SGN) * WN, BK, lane,
                  scratch + sg * SCR);
  if (more) {
    for (int t = 0; t < WPT; ++t) {
      const int i = tid + t * NT;
      const int k = k1 + 32 * (i % KWS);
      uint p;
      uint z;
      bonsai_trit_planes(blo[t], bhi[t], uint(k - 5 * (k / 5)), lut, p, z);
      if (i < BN * KWS) {
        wp[(1 - buf) * KWS * BN + (i % KWS) * BN + i / KWS] = bonsai_plane_order(p);
        wz[(1 - buf) * KWS * BN + (i % KWS) * BN + i / KWS] = bonsai_plane_order(z);
      }
    }
    for (int t = 0; t < SPT; ++t) {
      const int r = tid + t * NT;
      if (r < BN)
        wsc[(1 - buf) * BN + r] = sreg[t];
    }
  }
}
acc.store(y, N, m0 + (sg / SGN) * WM, n0 + (sg % SGN) * WN, M, N, scratch + sg * SCR, lane);
