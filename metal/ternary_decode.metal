// Slab decode (the slab path, M >= SLAB_MIN_M["ternary"], float16 / bfloat16 x):
// slab[S, K] = the S weight rows handed in, dense in T, for MLX's own matmul
// x @ slab^T. W ternary, 5 trits per byte: w uint8 [S, ceil(K/5)], byte
// i = sum_j (t[5i+j] + 1) * 3^j, scales [S, K/128]; the launcher passes the
// row slices w[n0 .. n0 + S), scales[n0 .. n0 + S) of the packed weight.
// Template: T (slab dtype = x dtype), CPT (16-byte stores per lane), NSG
// (simdgroups per threadgroup). Launched without the shared header
// (kernels.HEADERLESS), like binary_decode.
//
// Same mapping as binary_decode: a lane owns chunks of 8 consecutive weights
// and writes each with one 16-byte store; simdgroup i of the grid owns segment
// i % KS (32 CPT chunks) of row n = i / KS, lane l takes chunk 32 j + l of it
// in step j, so each simdgroup store covers 512 contiguous bytes. Chunk c's
// trits k0 = 8c .. 8c + 7 start at trit r = k0 % 5 of byte b = k0 / 5 (a
// division by the constant 5: a multiply-high) and span bytes b, b + 1 and,
// for r >= 3, b + 2 (which then holds trit k0 + 7 < K, so it is in the row).
// The codes come out of each byte with the multiply-shift of bonsai_trit_code
// in common.metal (floor(v / 3^i) = (v * ceil(2^16 / 3^i)) >> 16 for v < 243),
// as a plane of 2-bit fields that is shifted by 2r (no division, no table). Values are the bit
// patterns of +-s rounded once to T (exact for float16), and +0 where t is
// zero or T(s) is +-0: the bits of packing.dequantize.
const int S = w_shape[0];
const int KB = w_shape[1];  // ceil(K / 5) bytes per weight row
const int KG = scales_shape[1];
const int KC = 16 * KG;  // chunks per row
const int SEG = 32 * CPT;
const int KS = (KC + SEG - 1) / SEG;
const uint lane = thread_index_in_simdgroup;
const int item = int(threadgroup_position_in_grid.x) * NSG + int(simdgroup_index_in_threadgroup);
if (item >= S * KS)
  return;  // the grid is whole threadgroups; no barriers below
const int n = item / KS;
const int c0 = (item % KS) * SEG + int(lane);
const device uint8_t* wrow = w + size_t(n) * KB;
device T* out = slab + size_t(n) * (128 * KG);
uint b0[CPT];
uint b1[CPT];
uint b2[CPT];
uint r[CPT];
float s[CPT];
for (int j = 0; j < CPT; ++j) {
  const int c = c0 + 32 * j;
  const bool ok = c < KC;
  const uint k0 = 8u * uint(c);
  const uint b = k0 / 5u;
  r[j] = k0 - 5u * b;
  b0[j] = ok ? uint(wrow[b]) : 0u;
  b1[j] = ok ? uint(wrow[b + 1u]) : 0u;
  b2[j] = (ok && r[j] >= 3u) ? uint(wrow[b + 2u]) : 0u;
  s[j] = ok ? static_cast<float>(scales[size_t(n) * KG + (c >> 4)]) : 0.0f;
}
for (int j = 0; j < CPT; ++j) {
  const int c = c0 + 32 * j;
  if (c >= KC)
    break;  // chunks ascend with j
  uint p = uint(as_type<uint16_t>(static_cast<T>(s[j])));
  p = (p & 0x7fffu) == 0u ? 0u : p;  // +-0 -> +0 (s * -1 would be -0; dequantize folds it)
  const uint pp = p | (p << 16u);    // +s in both halves of a word
  const uint flip = p == 0u ? 0u : 0x80008000u;
  // The codes (t + 1) as a plane of 2-bit fields: trits 0-4 from b0, 5-9 from
  // b1, 10-11 from b2 (the most a chunk reaches: r + 7 <= 11). With
  // q_i = floor(v / 3^i) (the multiply-shift of bonsai_trit_code: exact for
  // v < 243) and code_i = q_i - 3 q_(i+1), sum_i code_i 4^i telescopes to
  // q_0 + q_1 + 4 q_2 + 16 q_3 + 64 q_4 (< 2^10). For b2 only codes 0-1 count:
  // q_0 + q_1 + 4 q_2 = code_0 + 4 code_1 + 16 q_2 (the rest lands past trit 11).
  const uint v0 = b0[j];
  const uint v1 = b1[j];
  const uint v2 = b2[j];
  const uint f0 = v0 + ((v0 * 21846u) >> 16u) + 4u * ((v0 * 7282u) >> 16u) + 16u * ((v0 * 2428u) >> 16u) +
                  64u * ((v0 * 810u) >> 16u);
  const uint f1 = v1 + ((v1 * 21846u) >> 16u) + 4u * ((v1 * 7282u) >> 16u) + 16u * ((v1 * 2428u) >> 16u) +
                  64u * ((v1 * 810u) >> 16u);
  const uint f2 = v2 + ((v2 * 21846u) >> 16u) + 4u * ((v2 * 7282u) >> 16u);
  uint codes = f0 + (f1 << 10u) + (f2 << 20u);
  codes = (codes >> (2u * r[j])) & 0xffffu;  // trit r at bits 0-1, 8 trits
  // Word e holds elements 2e (low half: little-endian) and 2e + 1: their codes
  // spread to bits 0-1 and 16-17. Code 1 (t = 0) clears its half; code 2 keeps
  // +s (bit 1 set: no sign flip), code 0 flips the sign: -s.
  uint v[4];
  for (int e = 0; e < 4; ++e) {
    const uint y = codes >> (4u * uint(e));
    const uint x = (y | (y << 14u)) & 0x30003u;
    const uint zero = (x & 0x10001u) * 0xffffu;
    v[e] = (pp ^ (flip & ~(x << 14u))) & ~zero;
  }
  const uint4 o = {v[0], v[1], v[2], v[3]};
  *reinterpret_cast<device uint4*>(out + 8 * c) = o;
}
