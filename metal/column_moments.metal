// Column moments of x [B, R, C] (a GroupNorm's statistics: pixels x channels), read in x's
// own dtype T and accumulated in float, so no float32 copy of x is ever made:
//   SQ = 0: out[b, j, c] = sum of x[b, r, c] over the rows r of block j;
//   SQ = 1: out[b, j, c] = sum of (x[b, r, c] - mean[b, c])^2 over those rows.
// The caller sums `out` over its blocks (a small float32 array). Template: T (x's dtype),
// SQ. Inputs: x, mean [B, C] float32 (read only when SQ = 1). Launched without the shared
// header (kernels.HEADERLESS).
//
// One thread per (channel c, row block j, sample b): the threads of a threadgroup are
// neighbouring channels, so each step of their row loops reads one contiguous run of a row.
// The grid is whole threadgroups along the channels (C rounded up), so threads past C return;
// there are no barriers. The row blocks are the grid's y extent: block j holds rows
// [j * RB, min((j + 1) * RB, R)), RB = ceil(R / blocks).
const uint c = thread_position_in_grid.x;
const uint j = thread_position_in_grid.y;
const uint b = thread_position_in_grid.z;
const uint R = uint(x_shape[1]);
const uint C = uint(x_shape[2]);
const uint NB = threadgroups_per_grid.y;
if (c >= C)
  return;
const uint RB = (R + NB - 1u) / NB;
const uint r0 = j * RB;
const uint r1 = min(r0 + RB, R);
const device T* col = x + size_t(b) * R * C + c;
// Rows are summed 64 at a time into a partial that then joins the running sum: float32
// rounding grows with 64 + rows / 64 terms, not with a block's rows (2,048 at 1024 px).
const float m = SQ ? mean[size_t(b) * C + c] : 0.0f;
float acc = 0.0f;
for (uint s = r0; s < r1; s += 64u) {
  const uint e = min(s + 64u, r1);
  float part = 0.0f;
  for (uint r = s; r < e; ++r) {
    const float v = static_cast<float>(col[size_t(r) * C]);
    if (SQ) {
      const float d = v - m;
      part += d * d;
    } else {
      part += v;
    }
  }
  acc += part;
}
out[(size_t(b) * NB + j) * C + c] = acc;
