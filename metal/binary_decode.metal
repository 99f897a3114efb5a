// Slab decode (the slab path, M >= SLAB_MIN_M["binary"], float16 / bfloat16 x):
// slab[S, K] = the S weight rows handed in, dense in T, for MLX's own matmul
// x @ slab^T. W binary: w uint32 [S, K/32] (element k = bit k%32 of word
// k/32, 1 -> +s, 0 -> -s), scales [S, K/128]; the launcher passes the row
// slices w[n0 .. n0 + S), scales[n0 .. n0 + S) of the packed weight, so the
// kernel never sees the slab's offset. Template: T (slab dtype = x dtype), CPT
// (16-byte stores per lane), NSG (simdgroups per threadgroup). Launched
// without the shared header (kernels.HEADERLESS): it is called once per slab,
// and MLX re-assembles header + body on every call.
//
// Written for store bandwidth: a lane owns "chunks" of 8 consecutive weights
// (one byte of packed bits, one scale: 8 | 128) and writes each chunk's 8
// values with ONE 16-byte store (uint4; the row is K % 128 == 0 elements, so
// chunk c of a row starts 16-byte aligned). Simdgroup i of the grid owns
// segment i % KS (32 CPT chunks = 256 CPT weights) of row n = i / KS; in step
// j < CPT lane l takes chunk 32 j + l of the segment, so each simdgroup store
// covers 512 contiguous bytes. A lane first loads all its packed bytes and
// scales (independent loads, in flight together), then decodes and stores.
// Values are the bit patterns of +-s rounded once to T (exact for float16):
// P = bits of T(s), and -s is P with the sign bit flipped (rounding is
// symmetric); +0 where T(s) is +-0: the bits of packing.dequantize.
const int S = w_shape[0];
const int KW = w_shape[1];
const int KC = 4 * KW;  // chunks (= packed bytes) per row
const int KG = scales_shape[1];
const int SEG = 32 * CPT;
const int KS = (KC + SEG - 1) / SEG;
const uint lane = thread_index_in_simdgroup;
const int item = int(threadgroup_position_in_grid.x) * NSG + int(simdgroup_index_in_threadgroup);
if (item >= S * KS)
  return;  // the grid is whole threadgroups; no barriers below
const int n = item / KS;
const int c0 = (item % KS) * SEG + int(lane);
const device uint8_t* wrow = reinterpret_cast<const device uint8_t*>(w + size_t(n) * KW);
device T* out = slab + size_t(n) * (32 * KW);
uint bits[CPT];
float s[CPT];
for (int j = 0; j < CPT; ++j) {
  const int c = c0 + 32 * j;
  const bool ok = c < KC;
  bits[j] = ok ? uint(wrow[c]) : 0u;
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
  const uint neg = ~bits[j];  // bit i set: element 8c + i is -s
  // Word q holds elements 2q (low half: little-endian) and 2q + 1. m << 15 puts
  // m's bit 0 on bit 15, m << 30 its bit 1 on bit 31; flip masks the rest.
  uint v[4];
  for (int q = 0; q < 4; ++q) {
    const uint m = (neg >> (2u * uint(q))) & 3u;
    v[q] = pp ^ (flip & ((m << 15u) | (m << 30u)));
  }
  const uint4 o = {v[0], v[1], v[2], v[3]};
  *reinterpret_cast<device uint4*>(out + 8 * c) = o;
}
