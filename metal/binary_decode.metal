// Slab decode (the slab path, M >= SLAB_MIN_M, float16 / bfloat16 x):
// slab[S, K] = the S weight rows handed in, dense in T, for MLX's own matmul
// x @ slab^T. W binary: w uint32 [S, K/32] (element k = bit k%32 of word
// k/32, 1 -> +s, 0 -> -s), scales [S, K/128]; the launcher passes the row
// slices w[n0 .. n0 + S), scales[n0 .. n0 + S) of the packed weight, so the
// kernel never sees the slab's offset. Template: T (slab dtype = x dtype), CG
// (128-wide scale groups per simdgroup), NSG (simdgroups per threadgroup).
// Launched without the shared header (kernels.HEADERLESS): it is called once
// per slab, and MLX re-assembles header + body on every call.
//
// Simdgroup i of the grid owns chunk c = i % KC (CG scale groups) of row
// n = i / KC. A whole simdgroup decodes each packed word: every lane loads
// the word (one broadcast load) and lane l writes element 32 j + l from bit
// l, so each simdgroup store covers 32 consecutive elements (64 contiguous
// bytes) with no shuffles. Values are +-s rounded once to T (exact for
// float16), and +0 where s is zero: the bits of packing.dequantize.
constexpr int GW = 4;  // packed words per scale group
const int S = w_shape[0];
const int KW = w_shape[1];
const int KG = scales_shape[1];
const int K = 32 * KW;
const int KC = (KG + CG - 1) / CG;
const uint lane = thread_index_in_simdgroup;
const int item = int(threadgroup_position_in_grid.x) * NSG + int(simdgroup_index_in_threadgroup);
if (item >= S * KC)
  return;  // the grid is whole threadgroups; no barriers below
const int n = item / KC;
const int g0 = (item % KC) * CG;
const int g1 = g0 + CG < KG ? g0 + CG : KG;
const device uint* wrow = w + size_t(n) * KW;
device T* out = slab + size_t(n) * K;
const T zero = static_cast<T>(0.0f);
for (int g = g0; g < g1; ++g) {
  const float s = static_cast<float>(scales[size_t(n) * KG + g]);
  // s * -1 would be -0 for s = +0 (and +-1 * -0 is -0); dequantize folds both to +0.
  const T sp = s == 0.0f ? zero : static_cast<T>(s);
  const T sn = s == 0.0f ? zero : static_cast<T>(-s);
  for (int j = 0; j < GW; ++j) {
    const uint word = wrow[GW * g + j];
    out[128 * g + 32 * j + int(lane)] = ((word >> lane) & 1u) ? sp : sn;
  }
}
