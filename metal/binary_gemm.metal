// Tiled GEMM (M >= 32): y[M, N] = x[M, K] @ W[N, K]^T, W binary:
// w uint32 [N, K/32] (element k = bit k%32 of word k/32, 1 -> +s, 0 -> -s),
// scales [N, K/128]. Template: T (x, y dtype), BM x BN tile per threadgroup,
// BK (32 or 64) k per step, SGM x SGN simdgroups. Each k-step stages BK
// columns of x and BK/32 packed words per weight row (decoded to +-s) in
// threadgroup memory, so no dense copy of W exists beyond a BK x BN tile.
typedef typename BonsaiTileType<T>::type TileT;
constexpr int NT = 32 * SGM * SGN;
constexpr int WM = BM / SGM;
constexpr int WN = BN / SGN;
constexpr int LDX = BK + BONSAI_TILE_PAD;  // x tile [BM][LDX], k fastest
constexpr int LDW = BN + BONSAI_TILE_PAD;  // w tile [BK][LDW], n fastest
constexpr int BITS = BK * BN / NT;         // bits of one word decoded per thread
static_assert(NT % BN == 0 && BITS * (NT / BN) == BK && 128 % BK == 0 && (BITS % 32 == 0 || 32 % BITS == 0),
              "decode split must cover the k-step's words of each row");
threadgroup TileT xs[BM * LDX];
threadgroup TileT ws[BK * LDW];
threadgroup float scratch[SGM * SGN * BONSAI_SCRATCH];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KW = K / 32;
const int KG = K / 128;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int n0 = int(threadgroup_position_in_grid.x) * BN;
const int m0 = int(threadgroup_position_in_grid.y) * BM;

// This thread decodes bits [wb, wb + BITS) of row n0 + wn's word: threads next
// to each other own neighbouring rows, so the tile writes are contiguous.
const int wn = tid % BN;
const int wb = (tid / BN) * BITS;
const bool wvalid = n0 + wn < N;
const int wrow = wvalid ? n0 + wn : 0;

BonsaiSimdTile<WM, WN> acc;
acc.zero();
for (int k0 = 0; k0 < K; k0 += BK) {
  bonsai_stage_x<BM, BK, NT>(xs, LDX, x, m0, M, K, k0, tid);
  // A k-step lies inside one scale group (128 % BK == 0).
  const float s = wvalid ? static_cast<float>(scales[size_t(wrow) * KG + k0 / 128]) : 0.0f;
  uint word = 0u;
#pragma unroll
  for (int b = 0; b < BITS; ++b) {
    const int kk = wb + b;
    if (b == 0 || kk % 32 == 0)
      word = wvalid ? w[size_t(wrow) * KW + (k0 + kk) / 32] : 0u;
    const uint bit = (word >> uint(kk % 32)) & 1u;
    ws[kk * LDW + wn] = static_cast<TileT>(bit ? s : -s);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  acc.mma(xs + (sg / SGN) * WM * LDX, LDX, ws + (sg % SGN) * WN, LDW, BK);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
acc.store(y, N, m0 + (sg / SGN) * WM, n0 + (sg % SGN) * WN, M, N,
          scratch + sg * BONSAI_SCRATCH, thread_index_in_simdgroup);
