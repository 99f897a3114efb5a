// Small-M path for float32 x (M < 32; on CUDA also M >= 32, since the tensor-core
// paths take 16-bit x only): y[M, N] = x[M, K] @ W[N, K]^T, W binary:
// w uint32 [N, K/32], scales [N, K/128]. Template: T (x, y dtype), MT rows of
// x per threadgroup, R weight rows per simdgroup, NSG simdgroups per group.
// K is walked in chunks of 1024 = 32 lanes x one 32-bit word: lane l owns
// word l of the chunk in each of its R rows, so a simdgroup reads 128
// contiguous bytes per row (coalesced). The chunk of x is staged once per
// threadgroup in threadgroup memory as float, padded by one slot per 32 so
// lane l's 32 values (index 33 l + j) sit in distinct banks, and reused by
// all R * NSG rows. A simd_sum finishes each dot product.
constexpr int CH = 1024;
constexpr int NT = 32 * NSG;
threadgroup float xs[MT * (CH + CH / 32)];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KW = K / 32;
const int KG = K / 128;
const uint lane = thread_index_in_simdgroup;
const int tid = int(thread_index_in_threadgroup);
const int n_base = (int(threadgroup_position_in_grid.x) * NSG + int(simdgroup_index_in_threadgroup)) * R;
const int m_base = int(threadgroup_position_in_grid.y) * MT;

float acc[MT][R];
for (int m = 0; m < MT; ++m)
  for (int r = 0; r < R; ++r)
    acc[m][r] = 0.0f;

for (int k0 = 0; k0 < K; k0 += CH) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // previous chunk fully consumed
  for (int i = tid; i < MT * CH; i += NT) {
    const int m = i / CH;
    const int k = i % CH;
    const bool ok = m_base + m < M && k0 + k < K;
    xs[m * (CH + CH / 32) + k + k / 32] = ok ? static_cast<float>(x[size_t(m_base + m) * K + k0 + k]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int wi = k0 / 32 + int(lane);  // this lane's word in the chunk
  if (wi < KW) {
    uint word[R];
    float s[R];
    for (int r = 0; r < R; ++r) {
      const bool ok = n_base + r < N;
      word[r] = ok ? w[size_t(n_base + r) * KW + wi] : 0u;
      s[r] = ok ? static_cast<float>(scales[size_t(n_base + r) * KG + wi / 4]) : 0.0f;
    }
    for (int m = 0; m < MT; ++m) {
      const threadgroup float* xl = xs + m * (CH + CH / 32) + int(lane) * 33;
      float total = 0.0f;
      float pos[R];
      for (int r = 0; r < R; ++r)
        pos[r] = 0.0f;
      for (int j = 0; j < 32; ++j) {
        const float xj = xl[j];
        total += xj;
        for (int r = 0; r < R; ++r)
          pos[r] += (word[r] & (1u << uint(j))) ? xj : 0.0f;
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
