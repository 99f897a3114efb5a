// Small-M path (M < 32, float16 / bfloat16 x): y[M, N] = x[M, K] @ W[N, K]^T,
// W binary: w uint32 [N, K/32], scales [N, K/128]. Template: T (x, y dtype),
// NJ (groups of 8 weight rows per threadgroup), KL (packed words per lane per
// step), NSG (simdgroups per threadgroup). A threadgroup owns 8 NJ weight rows
// and 16 rows of x, so W is read once for up to 16 rows of x. Its simdgroups
// split K: simdgroup sg takes the k-steps of 128 KL starting at
// 128 KL (sg + NSG i); in a step, lane (g, q) = (lane / 4, lane % 4) reads KL
// consecutive words (16 bytes at KL = 4: one scale group) of row 8j + g, the
// next step's words are loaded before this step's multiply, and the words go
// to the matrix units without shared memory on CUDA (BonsaiSkinnyTile). The
// NSG partial blocks are summed through threadgroup memory at the end.
constexpr int NT = 32 * NSG;
constexpr int RB = 8 * NJ;   // weight rows per threadgroup
constexpr int KI = 128 * KL;  // k per simdgroup step
constexpr int SCR = bonsai_skinny_scratch<NJ, KL>();
static_assert(KL == 1 || KL == 2 || KL == 4, "a lane's words stay inside one scale group");
threadgroup float red[NSG * 16 * RB];
threadgroup float scratch[NSG * SCR];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KW = K / 32;
const int KG = K / 128;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const uint lane = thread_index_in_simdgroup;
const int g = int(lane) / 4;
const int q = int(lane) % 4;
const int n0 = int(threadgroup_position_in_grid.x) * RB;
const int m0 = int(threadgroup_position_in_grid.y) * 16;

uint wv[NJ * KL];
float s[NJ];
uint wn[NJ * KL];
float sn[NJ];
// Words and scale of step kb for this lane (zero past K or N).
int kb = sg * KI;
for (int j = 0; j < NJ; ++j) {
  const int n = n0 + 8 * j + g;
  const int kq = kb + 32 * KL * q;
  const bool ok = n < N && kq < K;
  bonsai_load_words<KL>(w + size_t(ok ? n : 0) * KW + (ok ? kq / 32 : 0), ok, wv + j * KL);
  s[j] = ok ? static_cast<float>(scales[size_t(n) * KG + kq / 128]) : 0.0f;
}

BonsaiSkinnyTile<NJ, KL> acc;
acc.zero();
for (; kb < K; kb += NSG * KI) {
  const int kn = kb + NSG * KI;
  for (int j = 0; j < NJ; ++j) {
    const int n = n0 + 8 * j + g;
    const int kq = kn + 32 * KL * q;
    const bool ok = n < N && kq < K;
    bonsai_load_words<KL>(w + size_t(ok ? n : 0) * KW + (ok ? kq / 32 : 0), ok, wn + j * KL);
    sn[j] = ok ? static_cast<float>(scales[size_t(n) * KG + kq / 128]) : 0.0f;
  }
  for (int i = 0; i < NJ * KL; ++i)
    wv[i] = bonsai_plane_order(wv[i]);
  acc.mma_binary(x, K, m0, M, kb, wv, s, lane, scratch + sg * SCR);
  for (int i = 0; i < NJ * KL; ++i)
    wv[i] = wn[i];
  for (int j = 0; j < NJ; ++j)
    s[j] = sn[j];
}

acc.store_partial(red + sg * 16 * RB, RB, lane);
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int i = tid; i < 16 * RB; i += NT) {
  const int m = i / RB;
  const int n = i % RB;
  float v = 0.0f;
  for (int p = 0; p < NSG; ++p)
    v += red[p * 16 * RB + i];
  if (m0 + m < M && n0 + n < N)
    y[size_t(m0 + m) * N + n0 + n] = static_cast<T>(v);
}
