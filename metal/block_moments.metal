// Per-block moments of x [B, R, C] in one launch (a strip's share of a GroupNorm's
// statistics: pixels x channels), read in x's own dtype T and accumulated in float:
//   sums[b, j, c] = sum of x[b, r, c] over the rows r of block j;
//   m2s[b, j, c]  = sum of (x[b, r, c] - block mean)^2 over those rows.
// The caller merges the blocks (their counts, sums and m2s) with the parallel-variance
// formula: merged, one launch gives the statistics that two column_moments passes give,
// and every deviation is taken around a mean (no E[x^2] - E[x]^2 cancellation). The
// second loop reads the block's rows again, likely from cache at a strip's sizes. Template: T.
// Inputs: x. Launched without the shared header (kernels.HEADERLESS).
//
// One thread per (channel c, row block j, sample b), laid out as column_moments lays them:
// neighbouring channels in a threadgroup, so each row step reads one contiguous run. Threads
// past C return; there are no barriers. Block j holds rows [j * RB, min((j + 1) * RB, R)),
// RB = ceil(R / blocks); a block past R holds none and writes zeros.
const uint c = thread_position_in_grid.x;
const uint j = thread_position_in_grid.y;
const uint b = thread_position_in_grid.z;
const uint R = uint(x_shape[1]);
const uint C = uint(x_shape[2]);
const uint NB = threadgroups_per_grid.y;
if (c >= C)
  return;
const uint RB = (R + NB - 1u) / NB;
const uint r0 = min(j * RB, R);
const uint r1 = min(r0 + RB, R);
const device T* col = x + size_t(b) * R * C + c;
// Rows are summed 64 at a time into a partial that then joins the running sum: float32
// rounding grows with 64 + rows / 64 terms, not with a block's rows.
float acc = 0.0f;
for (uint s = r0; s < r1; s += 64u) {
  const uint e = min(s + 64u, r1);
  float part = 0.0f;
  for (uint r = s; r < e; ++r) {
    part += static_cast<float>(col[size_t(r) * C]);
  }
  acc += part;
}
const float m = r1 > r0 ? acc / float(r1 - r0) : 0.0f;
float dev = 0.0f;
for (uint s = r0; s < r1; s += 64u) {
  const uint e = min(s + 64u, r1);
  float part = 0.0f;
  for (uint r = s; r < e; ++r) {
    const float d = static_cast<float>(col[size_t(r) * C]) - m;
    part += d * d;
  }
  dev += part;
}
const size_t o = (size_t(b) * NB + j) * C + c;
sums[o] = acc;
m2s[o] = dev;
