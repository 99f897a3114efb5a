// Per-block moments of x [B, R, C] in one launch (a strip's share of a GroupNorm's
// statistics: pixels x channels), read in x's own dtype T and accumulated in float:
//   sums[b, j, c] = sum of x[b, r, c] over the rows r of block j;
//   m2s[b, j, c]  = sum of (x[b, r, c] - block mean)^2 over those rows.
// The caller merges the blocks (their counts, sums and m2s) with the parallel-variance
// formula: merged, one launch gives the statistics that two column_moments passes give,
// and every deviation is taken around a mean (no E[x^2] - E[x]^2 cancellation). Each
// slice reads its rows twice, the second time likely from cache at a strip's sizes.
// Template: T, S (slices per block). Inputs: x. Launched without the shared header
// (kernels.HEADERLESS).
//
// A threadgroup is 32 channels x S slices and owns one (row block j, sample b): the 32
// lanes of a slice read neighbouring channels, one contiguous run per row step. Block j
// holds rows [j * RB, min((j + 1) * RB, R)), RB = ceil(R / blocks), and slice s the s-th
// run of ceil(RB / S) of them. Slices split a block so that a strip's few outputs still
// come from enough threads to keep a GPU's loads in flight; slice 0 merges the S slices'
// moments (Chan's formula) through threadgroup memory. A block or slice past R holds no
// rows and adds nothing; a block of none writes zeros. Lanes past C read nothing and write
// nothing, but reach the barrier as every thread must.
// Declared first, at the kernel's outer scope, as Metal wants threadgroup arrays.
threadgroup float slice_sums[S][32];
threadgroup float slice_m2s[S][32];
threadgroup uint slice_rows[S][32];
const uint lane = thread_position_in_threadgroup.x;
const uint s = thread_position_in_threadgroup.y;
const uint c = threadgroup_position_in_grid.x * 32u + lane;
const uint j = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const uint R = uint(x_shape[1]);
const uint C = uint(x_shape[2]);
const uint NB = threadgroups_per_grid.y;
const uint RB = (R + NB - 1u) / NB;
const uint SB = (RB + S - 1u) / S;
const uint b0 = min(j * RB, R);
const uint b1 = min(b0 + RB, R);
const uint r0 = min(b0 + s * SB, b1);
const uint r1 = c < C ? min(r0 + SB, b1) : r0;
const device T* col = x + size_t(b) * R * C + (c < C ? c : 0u);
// Rows are summed 64 at a time into a partial that then joins the running sum: float32
// rounding grows with 64 + rows / 64 terms, not with a slice's rows.
float acc = 0.0f;
for (uint q = r0; q < r1; q += 64u) {
  const uint e = min(q + 64u, r1);
  float part = 0.0f;
  for (uint r = q; r < e; ++r) {
    part += static_cast<float>(col[size_t(r) * C]);
  }
  acc += part;
}
const float m = r1 > r0 ? acc / float(r1 - r0) : 0.0f;
float dev = 0.0f;
for (uint q = r0; q < r1; q += 64u) {
  const uint e = min(q + 64u, r1);
  float part = 0.0f;
  for (uint r = q; r < e; ++r) {
    const float d = static_cast<float>(col[size_t(r) * C]) - m;
    part += d * d;
  }
  dev += part;
}
slice_sums[s][lane] = acc;
slice_m2s[s][lane] = dev;
slice_rows[s][lane] = r1 - r0;
threadgroup_barrier(mem_flags::mem_threadgroup);
if (s != 0u || c >= C)
  return;
// Chan's merge in slice order: n rows so far with mean `mean` and squared deviations `m2`;
// a slice of k rows, mean mk, adds its own m2 and k * n / (n + k) * (mk - mean)^2. The sum
// is the slices' sums added, exactly as read.
float total = 0.0f;
float mean = 0.0f;
float m2 = 0.0f;
uint n = 0u;
for (uint t = 0u; t < S; ++t) {
  const uint k = slice_rows[t][lane];
  if (k == 0u)
    continue;
  const float mk = slice_sums[t][lane] / float(k);
  const float d = mk - mean;
  const uint nk = n + k;
  mean += d * (float(k) / float(nk));
  m2 += slice_m2s[t][lane] + d * d * (float(n) * float(k) / float(nk));
  total += slice_sums[t][lane];
  n = nk;
}
const size_t o = (size_t(b) * NB + j) * C + c;
sums[o] = total;
m2s[o] = m2;
