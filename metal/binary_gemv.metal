// Small-M path (M < 32): y[M, N] = x[M, K] @ W[N, K]^T, W binary:
// w uint32 [N, K/32], scales [N, K/128]. Template: T (x, y dtype), MT rows of
// x per threadgroup, R weight rows per simdgroup, NSG simdgroups per group.
// Lane l reads packed words l, l+32, ... of each of its R rows, so a
// simdgroup streams 128 contiguous bytes per row per step; the bits are
// consumed straight from the word (sum over set bits, then 2*pos - total).
// A simd_sum finishes each dot product.
const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KW = K / 32;
const int KG = K / 128;
const uint lane = thread_index_in_simdgroup;
const int n_base = (int(threadgroup_position_in_grid.x) * NSG + int(simdgroup_index_in_threadgroup)) * R;
const int m_base = int(threadgroup_position_in_grid.y) * MT;

float acc[MT][R];
for (int m = 0; m < MT; ++m)
  for (int r = 0; r < R; ++r)
    acc[m][r] = 0.0f;

for (int wi = int(lane); wi < KW; wi += 32) {
  uint word[R];
  float s[R];
  for (int r = 0; r < R; ++r) {
    const bool ok = n_base + r < N;
    word[r] = ok ? w[size_t(n_base + r) * KW + wi] : 0u;
    s[r] = ok ? static_cast<float>(scales[size_t(n_base + r) * KG + wi / 4]) : 0.0f;
  }
  for (int m = 0; m < MT; ++m) {
    if (m_base + m < M) {  // uniform across the simdgroup
      const device T* xp = x + size_t(m_base + m) * K + wi * 32;
      float total = 0.0f;
      float pos[R];
      for (int r = 0; r < R; ++r)
        pos[r] = 0.0f;
      for (int j = 0; j < 32; ++j) {
        const float xj = static_cast<float>(xp[j]);
        total += xj;
        for (int r = 0; r < R; ++r)
          pos[r] += ((word[r] >> uint(j)) & 1u) ? xj : 0.0f;
      }
      for (int r = 0; r < R; ++r)
        acc[m][r] += s[r] * (2.0f * pos[r] - total);
    }
  }
}

for (int m = 0; m < MT; ++m)
  for (int r = 0; r < R; ++r) {
    const float v = simd_sum(acc[m][r]);
    if (lane == 0u && m_base + m < M && n_base + r < N)
      y[size_t(m_base + m) * N + n_base + r] = static_cast<T>(v);
  }
