// Slab decode (the slab path, M >= SLAB_MIN_M, float16 / bfloat16 x):
// slab[S, K] = the S weight rows handed in, dense in T, for MLX's own matmul
// x @ slab^T. W ternary, 5 trits per byte: w uint8 [S, ceil(K/5)], byte
// i = sum_j (t[5i+j] + 1) * 3^j, scales [S, K/128]; the launcher passes the
// row slices w[n0 .. n0 + S), scales[n0 .. n0 + S) of the packed weight.
// Template: T (slab dtype = x dtype), CG (128-wide scale groups per
// simdgroup), NSG (simdgroups per threadgroup). Launched without the shared
// header (kernels.HEADERLESS), like binary_decode.
//
// Same mapping as binary_decode: simdgroup i of the grid owns chunk
// c = i % KC (CG scale groups) of row n = i / KC, and lane l writes element
// 32 j + l of each 32-element step, so each simdgroup store covers 64
// contiguous bytes. Lane l reads the byte holding its trit itself (the 32
// lanes read about 7 consecutive bytes; each byte serves up to 5 lanes) and
// takes trit k % 5 out of it with the multiply-shift of bonsai_trit_code in
// common.metal, written out here because this kernel has no header. Values
// are +-s rounded once to T (exact for float16), and +0 where t or s is
// zero: the bits of packing.dequantize.
const int S = w_shape[0];
const int KB = w_shape[1];  // ceil(K / 5) bytes per weight row
const int KG = scales_shape[1];
const int K = 128 * KG;
const int KC = (KG + CG - 1) / CG;
const uint lane = thread_index_in_simdgroup;
const int item = int(threadgroup_position_in_grid.x) * NSG + int(simdgroup_index_in_threadgroup);
if (item >= S * KC)
  return;  // the grid is whole threadgroups; no barriers below
const int n = item / KC;
const int g0 = (item % KC) * CG;
const int g1 = g0 + CG < KG ? g0 + CG : KG;
const device uint8_t* wrow = w + size_t(n) * KB;
device T* out = slab + size_t(n) * K;
const T zero = static_cast<T>(0.0f);
for (int g = g0; g < g1; ++g) {
  const float s = static_cast<float>(scales[size_t(n) * KG + g]);
  const T sp = s == 0.0f ? zero : static_cast<T>(s);
  const T sn = s == 0.0f ? zero : static_cast<T>(-s);
  for (int j = 0; j < 4; ++j) {
    const uint k = uint(128 * g + 32 * j) + lane;
    const uint packed = uint(wrow[k / 5u]);
    const uint r = k - 5u * (k / 5u);
    // floor(byte / 3^r) as a multiply by ceil(2^16 / 3^r) and a shift (exact
    // for byte < 243), then mod 3 the same way: the code t + 1.
    const uint mul = r == 0u ? 65536u : r == 1u ? 21846u : r == 2u ? 7282u : r == 3u ? 2428u : 810u;
    const uint q = (packed * mul) >> 16u;
    const uint code = q - 3u * ((q * 21846u) >> 16u);
    out[k] = code == 1u ? zero : (code == 2u ? sp : sn);
  }
}
