// Tiled GEMM (M >= 32): y[M, N] = x[M, K] @ W[N, K]^T, W ternary, 5 trits per
// byte: w uint8 [N, ceil(K/5)], byte i = sum_j (t[5i+j] + 1) * 3^j,
// scales [N, K/128]. Template: T (x, y dtype), BM x BN tile per threadgroup,
// BK (32 or 64) k per step, SGM x SGN simdgroups. Each k-step stages BK
// columns of x and the decoded BK x BN slice of W (t * s) in threadgroup
// memory; W is never expanded beyond that tile.
typedef typename BonsaiTileType<T>::type TileT;
constexpr int NT = 32 * SGM * SGN;
constexpr int WM = BM / SGM;
constexpr int WN = BN / SGN;
constexpr int LDX = BK + BONSAI_TILE_PAD;  // x tile [BM][LDX], k fastest
constexpr int LDW = BN + BONSAI_TILE_PAD;  // w tile [BK][LDW], n fastest
constexpr int TRITS = BK * BN / NT;        // trits of one row decoded per thread
static_assert(NT % BN == 0 && TRITS * (NT / BN) == BK && 128 % BK == 0, "decode split must cover BK trits per row");
threadgroup TileT xs[BM * LDX];
threadgroup TileT ws[BK * LDW];
threadgroup float scratch[SGM * SGN * BONSAI_SCRATCH];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KB = w_shape[1];  // ceil(K / 5) bytes per weight row
const int KG = K / 128;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int n0 = int(threadgroup_position_in_grid.x) * BN;
const int m0 = int(threadgroup_position_in_grid.y) * BM;

// This thread decodes trits [wb, wb + TRITS) of the k-step for row n0 + wn.
const int wn = tid % BN;
const int wb = (tid / BN) * TRITS;
const bool wvalid = n0 + wn < N;
const int wrow = wvalid ? n0 + wn : 0;

BonsaiSimdTile<WM, WN> acc;
acc.zero();
for (int k0 = 0; k0 < K; k0 += BK) {
  bonsai_stage_x<BM, BK, NT>(xs, LDX, x, m0, M, K, k0, tid);
  // A BK-step lies inside one scale group (128 % BK == 0).
  const float s = wvalid ? static_cast<float>(scales[size_t(wrow) * KG + k0 / 128]) : 0.0f;
  int bi = (k0 + wb) / 5;
  uint j = uint(k0 + wb - bi * 5);
  uint byte = wvalid ? uint(w[size_t(wrow) * KB + bi]) : 121u;  // 121 = five zero trits
#pragma unroll
  for (int t = 0; t < TRITS; ++t) {
    const uint code = bonsai_trit_code(byte, j);
    ws[(wb + t) * LDW + wn] = static_cast<TileT>(code == 2u ? s : (code == 0u ? -s : 0.0f));
    if (++j == 5u) {
      j = 0u;
      ++bi;
      byte = (wvalid && bi < KB) ? uint(w[size_t(wrow) * KB + bi]) : 121u;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  acc.mma(xs + (sg / SGN) * WM * LDX, LDX, ws + (sg % SGN) * WN, LDW, BK);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
acc.store(y, N, m0 + (sg / SGN) * WM, n0 + (sg % SGN) * WN, M, N,
          scratch + sg * BONSAI_SCRATCH, thread_index_in_simdgroup);
