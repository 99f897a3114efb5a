// Small-M path (M < 32): y[M, N] = x[M, K] @ W[N, K]^T, W ternary, 5 trits
// per byte: w uint8 [N, ceil(K/5)], scales [N, K/128]. Template: T (x, y
// dtype), MT rows of x per threadgroup, R weight rows per simdgroup, NSG
// simdgroups per group. Rows are not 4-byte aligned (K/5 bytes), so lane l
// reads bytes 4c..4c+3 (c = l, l+32, ...) one at a time: a simdgroup still
// streams 128 contiguous bytes per row per step. 20 trits span at most two
// scale groups: partial sums are kept per group and scaled once.
const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KB = w_shape[1];
const int KG = K / 128;
const int NC = (KB + 3) / 4;  // 4-byte chunks per row
const uint lane = thread_index_in_simdgroup;
const int n_base = (int(threadgroup_position_in_grid.x) * NSG + int(simdgroup_index_in_threadgroup)) * R;
const int m_base = int(threadgroup_position_in_grid.y) * MT;

float acc[MT][R];
for (int m = 0; m < MT; ++m)
  for (int r = 0; r < R; ++r)
    acc[m][r] = 0.0f;

for (int c = int(lane); c < NC; c += 32) {
  const int k_start = c * 20;
  const int g0 = k_start / 128;
  const int k_split = (g0 + 1) * 128;  // first k of the next scale group
  uint word[R];
  float s_lo[R];
  float s_hi[R];
  for (int r = 0; r < R; ++r) {
    const bool ok = n_base + r < N;
    const size_t row = size_t(ok ? n_base + r : 0) * KB;
    word[r] = 0x79797979u;  // byte 121 = five zero trits, for missing rows / bytes
    for (int i = 0; i < 4; ++i)
      if (ok && 4 * c + i < KB)
        word[r] = (word[r] & ~(0xFFu << uint(8 * i))) | (uint(w[row + 4 * c + i]) << uint(8 * i));
    s_lo[r] = ok ? static_cast<float>(scales[size_t(n_base + r) * KG + g0]) : 0.0f;
    s_hi[r] = (ok && g0 + 1 < KG) ? static_cast<float>(scales[size_t(n_base + r) * KG + g0 + 1]) : 0.0f;
  }
  float lo[MT][R];
  float hi[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) {
      lo[m][r] = 0.0f;
      hi[m][r] = 0.0f;
    }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 5; ++j) {
      const int k = k_start + i * 5 + j;
      const bool in_lo = k < k_split;
      float sign[R];
      for (int r = 0; r < R; ++r) {
        const uint code = bonsai_trit_code((word[r] >> uint(8 * i)) & 0xFFu, uint(j));
        sign[r] = float(int(code) - 1);
      }
      for (int m = 0; m < MT; ++m) {
        const float xk = (m_base + m < M && k < K) ? static_cast<float>(x[size_t(m_base + m) * K + k]) : 0.0f;
        for (int r = 0; r < R; ++r) {
          const float v = sign[r] * xk;
          lo[m][r] += in_lo ? v : 0.0f;
          hi[m][r] += in_lo ? 0.0f : v;
        }
      }
    }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r)
      acc[m][r] += lo[m][r] * s_lo[r] + hi[m][r] * s_hi[r];
}

for (int m = 0; m < MT; ++m)
  for (int r = 0; r < R; ++r) {
    const float v = simd_sum(acc[m][r]);
    if (lane == 0u && m_base + m < M && n_base + r < N)
      y[size_t(m_base + m) * N + n_base + r] = static_cast<T>(v);
  }
