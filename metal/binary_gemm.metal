// Tiled GEMM (M >= 32): y[M, N] = x[M, K] @ W[N, K]^T, W binary:
// w uint32 [N, K/32] (element k = bit k%32 of word k/32, 1 -> +s, 0 -> -s),
// scales [N, K/128]. Template: T (x, y dtype), BM x BN tile per threadgroup,
// BK (32 or 64) k per step, SGM x SGN simdgroups (each a WM x WN block).
// Two-stage pipeline, one threadgroup barrier per k-step: while the
// simdgroups multiply step s out of buffer s%2, the copy of step s+1's x tile
// into the other buffer is in flight (asynchronous on CUDA) and step s+1's
// packed words and scales sit in registers; they are stored after the
// multiply. Only packed words are staged for W (in fragment bit order,
// bonsai_plane_order): each simdgroup decodes its
// own B block from them right before its multiply-accumulates
// (BonsaiSimdTile::mma_binary), so W is never dense in threadgroup memory.
typedef typename BonsaiTileType<T>::type TileT;
constexpr int NT = 32 * SGM * SGN;
constexpr int WM = BM / SGM;
constexpr int WN = BN / SGN;
constexpr int LDX = BK + BONSAI_TILE_PAD;  // x tile [BM][LDX], k fastest
constexpr int KWS = BK / 32;               // packed words per weight row per k-step
constexpr int WPT = (BN * KWS + NT - 1) / NT;  // words each thread stages per k-step
constexpr int SPT = (BN + NT - 1) / NT;    // scales each thread stages per k-step
constexpr int SCR = bonsai_tile_scratch<WM, WN>();
static_assert(BK % 32 == 0 && 128 % BK == 0, "a k-step is whole words inside one scale group");
threadgroup TileT xs[2 * BM * LDX];
threadgroup uint wp[2 * KWS * BN];  // [buffer][word of the step][row]
threadgroup float wsc[2 * BN];      // [buffer][row]
threadgroup float scratch[SGM * SGN * SCR];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KW = K / 32;
const int KG = K / 128;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const uint lane = thread_index_in_simdgroup;
const int n0 = int(threadgroup_position_in_grid.x) * BN;
const int m0 = int(threadgroup_position_in_grid.y) * BM;
const int steps = K / BK;

// Step s's words (row, word) = (i / KWS, i % KWS) for i = tid + t * NT, and
// scale of row tid + t * NT, held in registers between load and store.
uint wreg[WPT];
float sreg[SPT];

// Prologue: step 0 into buffer 0.
bonsai_stage_x<BM, BK, NT>(xs, LDX, x, m0, M, K, 0, tid);
bonsai_stage_commit();
for (int t = 0; t < WPT; ++t) {
  const int i = tid + t * NT;
  const int n = i < BN * KWS ? n0 + i / KWS : N;
  if (i < BN * KWS)
    wp[(i % KWS) * BN + i / KWS] = bonsai_plane_order(n < N ? w[size_t(n) * KW + i % KWS] : 0u);
}
for (int t = 0; t < SPT; ++t) {
  const int r = tid + t * NT;
  if (r < BN)
    wsc[r] = n0 + r < N ? static_cast<float>(scales[size_t(n0 + r) * KG]) : 0.0f;
}

BonsaiSimdTile<WM, WN> acc;
acc.zero();
for (int s = 0; s < steps; ++s) {
  const int buf = s % 2;
  bonsai_stage_wait();
  // Step s is staged; every simdgroup is done with step s - 1's buffer.
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const bool more = s + 1 < steps;
  if (more) {
    const int k1 = (s + 1) * BK;
    bonsai_stage_x<BM, BK, NT>(xs + (1 - buf) * BM * LDX, LDX, x, m0, M, K, k1, tid);
    bonsai_stage_commit();
    for (int t = 0; t < WPT; ++t) {
      const int i = tid + t * NT;
      const int n = i < BN * KWS ? n0 + i / KWS : N;
      wreg[t] = n < N ? w[size_t(n) * KW + k1 / 32 + i % KWS] : 0u;
    }
    for (int t = 0; t < SPT; ++t) {
      const int r = tid + t * NT;
      sreg[t] = (r < BN && n0 + r < N) ? static_cast<float>(scales[size_t(n0 + r) * KG + k1 / 128]) : 0.0f;
    }
  }
  acc.mma_binary(xs + buf * BM * LDX + (sg / SGN) * WM * LDX, LDX, wp + buf * KWS * BN + (sg % SGN) * WN, BN,
                 wsc + buf * BN + (sg % SGN) * WN, BK, lane, scratch + sg * SCR);
  if (more) {
    for (int t = 0; t < WPT; ++t) {
      const int i = tid + t * NT;
      if (i < BN * KWS)
        wp[(1 - buf) * KWS * BN + (i % KWS) * BN + i / KWS] = bonsai_plane_order(wreg[t]);
    }
    for (int t = 0; t < SPT; ++t) {
      const int r = tid + t * NT;
      if (r < BN)
        wsc[(1 - buf) * BN + r] = sreg[t];
    }
  }
}
acc.store(y, N, m0 + (sg / SGN) * WM, n0 + (sg % SGN) * WN, M, N, scratch + sg * SCR, lane);
