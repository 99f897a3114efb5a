// C++ stand-in for the subset of the Metal Shading Language our kernels use.
// The harness compiles the exact header + body strings we hand to
// mx.fast.metal_kernel against this file and runs them on CPU threads:
// one OS thread per GPU thread of a threadgroup, threadgroups one after another.
// Anything outside this subset must fail to compile (or be rejected by the
// Python-side scan in harness.py) rather than be emulated loosely.
#pragma once
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// Address spaces: the harness rewrite turns threadgroup *arrays* into shared
// storage before compiling; what is left of these are pointer qualifiers.
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;
typedef half float16_t;

// bfloat16 as MLX's Metal preamble spells it; float conversions round to nearest even.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
struct uint4 { uint x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct ulong2 { uint64_t x, y; };

namespace metal {
using std::abs;
using std::exp;
using std::fabs;
using std::fma;
using std::max;
using std::min;
using std::sqrt;
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
}  // namespace metal
using namespace metal;

template <typename To, typename From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// ---------------------------------------------------------------------------
// Execution model.

namespace bonsai_emu {

inline int barrier_timeout_ms = 20000;

struct Abort : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A reusable barrier whose waiters give up (loudly) when a thread of the group
// failed or never arrives: a divergent barrier or collective on a GPU is a
// bug, here it must not hang the test run.
struct Barrier {
  int n = 0, count = 0;
  uint64_t gen = 0;
  std::mutex m;
  std::condition_variable cv;
  std::atomic<bool>* failed = nullptr;
  const char* what = "barrier";
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    uint64_t g = gen;
    if (++count == n) {
      count = 0;
      ++gen;
      cv.notify_all();
      return;
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(barrier_timeout_ms);
    while (gen == g) {
      cv.wait_for(lk, std::chrono::milliseconds(20));
      if (gen != g) break;
      if (failed->load()) throw Abort("aborted: another thread failed");
      if (std::chrono::steady_clock::now() > deadline)
        throw std::runtime_error(std::string(what) +
                                 " timed out: not every thread arrived (divergent barrier/collective?)");
    }
  }
};

// One record per simdgroup_matrix operation of a simdgroup: every lane must
// issue the same sequence with the same arguments (the op is collective).
struct MatOp {
  int kind;
  const void* p;
  uint64_t ld;
};

struct SimdState {
  Barrier bar;
  alignas(16) unsigned char slots[32][16];
  std::mutex log_m;
  std::vector<MatOp> log;
};

struct Group {
  int nthreads = 0;
  Barrier tg_bar;
  std::vector<SimdState*> simd;
  std::mutex tg_m;
  std::map<int, std::vector<unsigned char>> tg_mem;
  std::atomic<bool> failed{false};
};

struct Lane {
  Group* g = nullptr;
  uint sg = 0, lane = 0;
  size_t nmatops = 0;
};
inline thread_local Lane lane_ctx;

// One shared allocation per threadgroup array declaration, poisoned with 0xFF
// bytes (NaN for float/half) so a read before write shows up in the output.
template <typename A>
inline A* tg_array(int id) {
  Group* g = lane_ctx.g;
  std::lock_guard<std::mutex> lk(g->tg_m);
  auto it = g->tg_mem.find(id);
  if (it == g->tg_mem.end()) {
    it = g->tg_mem.emplace(id, std::vector<unsigned char>(sizeof(A) + 64, 0xFF)).first;
  }
  if (it->second.size() != sizeof(A) + 64) throw std::runtime_error("threadgroup array size mismatch");
  unsigned char* p = it->second.data();
  p += (64 - (reinterpret_cast<uintptr_t>(p) & 63)) & 63;
  return reinterpret_cast<A*>(p);
}

inline void check_matop(int kind, const void* p, uint64_t ld) {
  Lane& L = lane_ctx;
  SimdState* s = L.g->simd[L.sg];
  std::lock_guard<std::mutex> lk(s->log_m);
  size_t i = L.nmatops++;
  if (i == s->log.size()) {
    s->log.push_back({kind, p, ld});
  } else {
    const MatOp& o = s->log[i];
    if (o.kind != kind || o.p != p || o.ld != ld)
      throw std::runtime_error("non-uniform simdgroup_matrix operation across lanes of a simdgroup");
  }
}

template <typename T>
inline T simd_exchange_reduce(T v, int op) {
  static_assert(sizeof(T) <= 16, "simd collective on a type wider than 16 bytes");
  Lane& L = lane_ctx;
  SimdState* s = L.g->simd[L.sg];
  std::memcpy(s->slots[L.lane], &v, sizeof(T));
  s->bar.wait();
  T out;
  T vals[32];
  for (int i = 0; i < 32; ++i) std::memcpy(&vals[i], s->slots[i], sizeof(T));
  // Pairwise tree, like a butterfly reduction on hardware.
  if (op == 0) {
    for (int w = 16; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) vals[i] = T(vals[i] + vals[i + w]);
    out = vals[0];
  } else if (op == 1) {
    out = vals[0];
    for (int i = 1; i < 32; ++i) out = vals[i] > out ? vals[i] : out;
  } else {
    out = vals[0];
    for (int i = 1; i < 32; ++i) out = vals[i] < out ? vals[i] : out;
  }
  s->bar.wait();
  return out;
}

template <typename T>
inline T simd_read_lane(T v, uint src) {
  Lane& L = lane_ctx;
  SimdState* s = L.g->simd[L.sg];
  std::memcpy(s->slots[L.lane], &v, sizeof(T));
  s->bar.wait();
  T out;
  std::memcpy(&out, s->slots[src & 31], sizeof(T));
  s->bar.wait();
  return out;
}

}  // namespace bonsai_emu

inline void threadgroup_barrier(metal::mem_flags) { bonsai_emu::lane_ctx.g->tg_bar.wait(); }
inline void simdgroup_barrier(metal::mem_flags) {
  auto& L = bonsai_emu::lane_ctx;
  L.g->simd[L.sg]->bar.wait();
}

template <typename T> inline T simd_sum(T v) { return bonsai_emu::simd_exchange_reduce(v, 0); }
template <typename T> inline T simd_max(T v) { return bonsai_emu::simd_exchange_reduce(v, 1); }
template <typename T> inline T simd_min(T v) { return bonsai_emu::simd_exchange_reduce(v, 2); }
template <typename T> inline T simd_shuffle(T v, ushort src) { return bonsai_emu::simd_read_lane(v, src); }
template <typename T> inline T simd_broadcast(T v, ushort src) { return bonsai_emu::simd_read_lane(v, src); }
template <typename T> inline T simd_shuffle_xor(T v, ushort m) {
  return bonsai_emu::simd_read_lane(v, bonsai_emu::lane_ctx.lane ^ m);
}
template <typename T> inline T simd_shuffle_down(T v, ushort d) {
  uint l = bonsai_emu::lane_ctx.lane + d;
  T other = bonsai_emu::simd_read_lane(v, l > 31 ? bonsai_emu::lane_ctx.lane : l);
  return other;
}

// simdgroup_matrix: collective but uniform, so every emulated lane holds and
// computes the whole tile. Products accumulate in float like the hardware.
template <typename T, int R, int C>
struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "only 8x8 simdgroup matrices are emulated");
  T e[8][8];
};

template <typename T, int R, int C>
inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  bonsai_emu::check_matop(1, nullptr, 0);
  simdgroup_matrix<T, R, C> m;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) m.e[i][j] = v;
  return m;
}

template <typename T, typename U>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, const U* src, uint64_t elements_per_row) {
  static_assert(std::is_same<T, typename std::remove_cv<U>::type>::value,
                "simdgroup_load: matrix and memory element types must match");
  bonsai_emu::check_matop(2, src, elements_per_row);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) m.e[i][j] = src[i * elements_per_row + j];
}

template <typename T, typename U>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, U* dst, uint64_t elements_per_row) {
  static_assert(std::is_same<T, U>::value, "simdgroup_store: matrix and memory element types must match");
  bonsai_emu::check_matop(3, dst, elements_per_row);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[i * elements_per_row + j] = m.e[i][j];
}

template <typename T>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                          const simdgroup_matrix<T, 8, 8>& b,
                                          const simdgroup_matrix<T, 8, 8>& c) {
  bonsai_emu::check_matop(4, nullptr, 0);
  simdgroup_matrix<T, 8, 8> r;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = float(c.e[i][j]);
      for (int k = 0; k < 8; ++k) acc += float(a.e[i][k]) * float(b.e[k][j]);
      r.e[i][j] = T(acc);
    }
  d = r;
}
