// Small-M path (M < 32, float16 / bfloat16 x): y[M, N] = x[M, K] @ W[N, K]^T,
// W ternary, 5 trits per byte: w uint8 [N, ceil(K/5)], scales [N, K/128].
// Same scheme as binary_gemv (a threadgroup owns 8 NJ weight rows and 16 rows
// of x; its NSG simdgroups split K in steps of 128 KL; lane (g, q) owns KL
// 32-trit words of row 8j + g per step; partial blocks summed at the end).
// Each word comes from the 8 bytes holding its 32 trits, loaded a step ahead
// and turned into two bit planes (+1 / non-zero, fragment bit order) through
// a 256-entry byte table in threadgroup memory.
constexpr int NT = 32 * NSG;
constexpr int RB = 8 * NJ;
constexpr int KI = 128 * KL;
constexpr int SCR = bonsai_skinny_scratch<NJ, KL>();
static_assert(KL == 1 || KL == 2 || KL == 4, "a lane's words stay inside one scale group");
threadgroup float red[NSG * 16 * RB];
threadgroup float scratch[NSG * SCR];
threadgroup uint lut[256];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KB = w_shape[1];  // ceil(K / 5) bytes per weight row
const int KG = K / 128;
const int tid = int(thread_index_in_threadgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const uint lane = thread_index_in_simdgroup;
const int g = int(lane) / 4;
const int q = int(lane) % 4;
const int n0 = int(threadgroup_position_in_grid.x) * RB;
const int m0 = int(threadgroup_position_in_grid.y) * 16;

for (int i = tid; i < 256; i += NT)
  lut[i] = bonsai_trit_lut_entry(uint(i));

uint blo[NJ * KL];
uint bhi[NJ * KL];
float s[NJ];
uint nlo[NJ * KL];
uint nhi[NJ * KL];
float sn[NJ];
uint wv[NJ * KL];
uint wz[NJ * KL];
int kb = sg * KI;
for (int j = 0; j < NJ; ++j) {
  const int n = n0 + 8 * j + g;
  const int kq = kb + 32 * KL * q;
  const bool ok = n < N && kq < K;
  for (int l = 0; l < KL; ++l)
    bonsai_load_trit_bytes(w + size_t(ok ? n : 0) * KB, (kq + 32 * l) / 5, KB, ok, blo[j * KL + l], bhi[j * KL + l]);
  s[j] = ok ? static_cast<float>(scales[size_t(n) * KG + kq / 128]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // lut

BonsaiSkinnyTile<NJ, KL> acc;
acc.zero();
for (; kb < K; kb += NSG * KI) {
  const int kn = kb + NSG * KI;
  for (int j = 0; j < NJ; ++j) {
    const int n = n0 + 8 * j + g;
    const int kq = kn + 32 * KL * q;
    const bool ok = n < N && kq < K;
    for (int l = 0; l < KL; ++l)
      bonsai_load_trit_bytes(w + size_t(ok ? n : 0) * KB, (kq + 32 * l) / 5, KB, ok, nlo[j * KL + l],
                             nhi[j * KL + l]);
    sn[j] = ok ? static_cast<float>(scales[size_t(n) * KG + kq / 128]) : 0.0f;
  }
  for (int j = 0; j < NJ; ++j)
    for (int l = 0; l < KL; ++l) {
      const int k = kb + 32 * (KL * q + l);
      uint p;
      uint z;
      bonsai_trit_planes(blo[j * KL + l], bhi[j * KL + l], uint(k - 5 * (k / 5)), lut, p, z);
      wv[j * KL + l] = bonsai_plane_order(p);
      wz[j * KL + l] = bonsai_plane_order(z);
    }
  acc.mma_ternary(x, K, m0, M, kb, wv, wz, s, lane, scratch + sg * SCR);
  for (int i = 0; i < NJ * KL; ++i) {
    blo[i] = nlo[i];
    bhi[i] = nhi[i];
  }
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
