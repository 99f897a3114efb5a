// Small-M path for float32 x (M < 32; on CUDA also M >= 32, since the tensor-core
// paths take 16-bit x only): y[M, N] = x[M, K] @ W[N, K]^T, W ternary, 5 trits
// per byte: w uint8 [N, ceil(K/5)], scales [N, K/128]. Template: T (x, y
// dtype), MT rows of x per threadgroup, R weight rows per simdgroup, NSG
// simdgroups per group. K is walked in chunks of 640 trits = 32 lanes x 4
// bytes: lane l owns bytes 4l..4l+3 of the chunk in each of its R rows (read
// one at a time: rows are K/5 bytes, not 4-byte aligned; the simdgroup still
// reads 128 contiguous bytes per row). The x chunk is staged once per
// threadgroup as float, lane l's 20 values at 21 l + i (21 is odd: distinct
// banks). 20 trits span at most two scale groups: partial sums are kept per
// group and scaled once.
constexpr int CH = 640;
constexpr int NT = 32 * NSG;
threadgroup float xs[MT * 32 * 21];

const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int KB = w_shape[1];
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
    xs[m * 32 * 21 + (k / 20) * 21 + k % 20] = ok ? static_cast<float>(x[size_t(m_base + m) * K + k0 + k]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int k_start = k0 + int(lane) * 20;
  if (k_start < K) {
    const int b0 = k_start / 5;  // first byte of this lane's 4
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
        if (ok && b0 + i < KB)
          word[r] = (word[r] & ~(0xFFu << uint(8 * i))) | (uint(w[row + b0 + i]) << uint(8 * i));
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
        const bool in_lo = k_start + i * 5 + j < k_split;
        float sign[R];
        for (int r = 0; r < R; ++r)
          sign[r] = float(int(bonsai_trit_code((word[r] >> uint(8 * i)) & 0xFFu, uint(j))) - 1);
        for (int m = 0; m < MT; ++m) {
          const float xk = xs[m * 32 * 21 + int(lane) * 21 + i * 5 + j];  // 0 past K
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
}

for (int m = 0; m < MT; ++m)
  for (int r = 0; r < R; ++r) {
    const float v = simd_sum(acc[m][r]);
    if (lane == 0u && m_base + m < M && n_base + r < N)
      y[size_t(m_base + m) * N + n_base + r] = static_cast<T>(v);
  }
