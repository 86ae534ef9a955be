// Runs the per-thread functions of cuda/carafe_reassemble.cuh on the host, one work item after another, so every
// kernel variant the GPU runs (each fixed kernel size and the run-time one, 32- and 64-bit indices, in fp64, fp32,
// fp16 and bf16) is tested against the float64 reference on machines without a GPU (tests/test_cuda_kernels_host.py).
// Built with: g++ -std=c++17 -O1 -shared -fPIC -I cuda tests/cuda_host_harness.cpp
//
// fp16 and bf16 are host types holding the same bits as torch's float16 / bfloat16, converted exactly as the GPU
// does (__half2float / __bfloat162float are exact; __float2half_rn / __float2bfloat16_rn round to nearest even).
//
// Built with -DCARAFE_TRACE instead, every load() / store() of the kernels records its address and touches no
// memory; host_traffic_* then counts the distinct 32-byte sectors each sampled thread block reads and writes (the
// memory-traffic model of scripts/bench_cuda_static.py: perfect reuse inside a block, none between blocks).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "carafe_reassemble.cuh"

namespace carafe {

struct HostHalf {
  std::uint16_t bits;
};
struct HostBFloat16 {
  std::uint16_t bits;
};

inline std::uint32_t float_bits(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}
inline float bits_float(std::uint32_t x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

// binary16 -> binary32, exact.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000 | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// binary32 -> binary16, round to nearest even (as __float2half_rn).
inline std::uint16_t float_to_half(float f) {
  const std::uint32_t x = float_bits(f), sign = (x >> 16) & 0x8000, magnitude = x & 0x7fffffff;
  if (magnitude > 0x7f800000) return static_cast<std::uint16_t>(sign | 0x7e00);  // NaN
  if (magnitude >= 0x477ff000) return static_cast<std::uint16_t>(sign | 0x7c00);  // >= 65520 (and inf): inf
  if (magnitude < 0x38800000) {  // below 2^-14: a multiple of 2^-24 (1024 of them is the smallest normal)
    const float units = std::nearbyint(bits_float(magnitude) * 16777216.0f);  // exact scaling, then round to even
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(units));
  }
  const std::uint32_t rounded = magnitude + 0xfff + ((magnitude >> 13) & 1);
  return static_cast<std::uint16_t>(sign | ((rounded - 0x38000000) >> 13));
}

inline float bfloat16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

// binary32 -> bfloat16, round to nearest even (as __float2bfloat16_rn); NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bfloat16(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<std::uint16_t>((x >> 16) | 0x0040);
  return static_cast<std::uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

template <>
struct Convert<HostHalf> {
  static float widen(HostHalf v) { return half_to_float(v.bits); }
  static HostHalf narrow(float v) { return HostHalf{float_to_half(v)}; }
};
template <>
struct Convert<HostBFloat16> {
  static float widen(HostBFloat16 v) { return bfloat16_to_float(v.bits); }
  static HostBFloat16 narrow(float v) { return HostBFloat16{float_to_bfloat16(v)}; }
};

}  // namespace carafe

namespace carafe {

// The channels_last mask gradient of the L = nhwc_lanes<T>() work items first .. first + L - 1 (the lanes of one
// output pixel and tap chunk), as the GPU kernel computes it: each lane's partial sums, then the kernel's butterfly
// of warp shuffles (at each step lane l adds lane l ^ offset's sums to its own: own + other, the same additions in
// the same order), then each lane's stores.
template <int K, typename T, typename I>
void masks_nhwc_lanes(const Geometry<I>& g, I first, const T* grad_out, const T* x, T* grad_m) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int L = nhwc_lanes<T>(), TAPS = nhwc_mask_taps<K>();
  Acc acc[L][TAPS], other[L][TAPS];
  for (int l = 0; l < L; ++l) backward_masks_nhwc_partial<K>(g, static_cast<I>(first + l), grad_out, x, acc[l]);
  for (int offset = L / 2; offset > 0; offset /= 2) {
    std::memcpy(other, acc, sizeof acc);
    for (int l = 0; l < L; ++l) {
      for (int t = 0; t < TAPS; ++t) acc[l][t] = other[l][t] + other[l ^ offset][t];
    }
  }
  for (int l = 0; l < L; ++l) backward_masks_nhwc_store<K>(g, static_cast<I>(first + l), acc[l], grad_m);
}

}  // namespace carafe

// The conversions themselves, for the test that compares them with torch's.
extern "C" void host_round_f16(const float* in, std::uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = carafe::float_to_half(in[i]);
}
extern "C" void host_round_bf16(const float* in, std::uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = carafe::float_to_bfloat16(in[i]);
}
extern "C" void host_widen_f16(const std::uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = carafe::half_to_float(in[i]);
}

#if defined(CARAFE_TRACE)
namespace {
std::vector<std::uintptr_t> trace_reads, trace_writes;
constexpr int kSectorShift = 5;  // 32-byte sectors, the unit of L2 <-> L1 transfers

long long distinct(std::vector<std::uintptr_t>* v) {
  std::sort(v->begin(), v->end());
  const long long count = std::unique(v->begin(), v->end()) - v->begin();
  v->clear();
  return count;
}
}  // namespace

namespace carafe {
void carafe_trace_read(const void* address) {
  trace_reads.push_back(reinterpret_cast<std::uintptr_t>(address) >> kSectorShift);
}
void carafe_trace_write(const void* address) {
  trace_writes.push_back(reinterpret_cast<std::uintptr_t>(address) >> kSectorShift);
}
}  // namespace carafe

// Sectors read and written by `samples` thread blocks of `threads` work items each, spread evenly over the grid,
// scaled to the whole grid: result[0] = read sectors, result[1] = written sectors, result[2] = blocks in the grid.
template <typename Item>
void traffic(long long items, long long threads, long long samples, long long* result, Item item) {
  const long long blocks = (items + threads - 1) / threads;
  samples = std::min(samples, blocks);
  double reads = 0, writes = 0;
  for (long long s = 0; s < samples; ++s) {
    const long long block = samples == 1 ? 0 : s * (blocks - 1) / (samples - 1);
    for (long long i = block * threads; i < std::min(items, (block + 1) * threads); ++i) item(i);
    reads += distinct(&trace_reads);
    writes += distinct(&trace_writes);
  }
  result[0] = static_cast<long long>(reads * blocks / samples + 0.5);
  result[1] = static_cast<long long>(writes * blocks / samples + 0.5);
  result[2] = blocks;
}

#define HOST_KERNEL(NAME, PASS, K, I, T)                                                                          \
  extern "C" void host_traffic_##NAME(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS, long long threads, \
                                      long long samples, long long* result) {                                    \
    const carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                           \
    traffic(g.PASS##_items(K), threads, samples, result,                                                        \
            [&](long long i) { carafe::PASS##_item<K>(g, static_cast<I>(i), a, b, out); });                      \
  }
#define HOST_NHWC_KERNEL(NAME, PASS, K, I, T)                                                                     \
  extern "C" void host_traffic_##NAME(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS, long long masks_nhwc, \
                                      long long threads, long long samples, long long* result) {                 \
    carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                                 \
    g.masks_nhwc = masks_nhwc != 0;                                                                             \
    traffic(carafe::PASS##_nhwc_items<K, T>(g), threads, samples, result,                                      \
            [&](long long i) { carafe::PASS##_nhwc_item<K>(g, static_cast<I>(i), a, b, out); });                 \
  }
#define HOST_NHWC_MASKS_KERNEL(NAME, K, I, T)                                                                     \
  extern "C" void host_traffic_##NAME(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS, long long masks_nhwc, \
                                      long long threads, long long samples, long long* result) {                 \
    carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                                 \
    g.masks_nhwc = masks_nhwc != 0;                                                                             \
    traffic(carafe::backward_masks_nhwc_items<K, T>(g), threads, samples, result, [&](long long i) {           \
      if (i % carafe::nhwc_lanes<T>() == 0) carafe::masks_nhwc_lanes<K>(g, static_cast<I>(i), a, b, out);       \
    });                                                                                                         \
  }
#else
#define HOST_KERNEL(NAME, PASS, K, I, T)                                                                          \
  extern "C" void host_##NAME(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS) {                          \
    const carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                           \
    const I total = g.PASS##_items(K);                                                                          \
    for (I i = 0; i < total; ++i) carafe::PASS##_item<K>(g, i, a, b, out);                                       \
  }
#define HOST_NHWC_KERNEL(NAME, PASS, K, I, T)                                                                     \
  extern "C" void host_##NAME(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS, long long masks_nhwc) {     \
    carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                                 \
    g.masks_nhwc = masks_nhwc != 0;                                                                             \
    const I total = carafe::PASS##_nhwc_items<K, T>(g);                                                         \
    for (I i = 0; i < total; ++i) carafe::PASS##_nhwc_item<K>(g, i, a, b, out);                                  \
  }
#define HOST_NHWC_MASKS_KERNEL(NAME, K, I, T)                                                                     \
  extern "C" void host_##NAME(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS, long long masks_nhwc) {     \
    carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                                 \
    g.masks_nhwc = masks_nhwc != 0;                                                                             \
    const I total = carafe::backward_masks_nhwc_items<K, T>(g);                                                 \
    for (I i = 0; i < total; i += carafe::nhwc_lanes<T>()) carafe::masks_nhwc_lanes<K>(g, i, a, b, out);          \
  }
#endif

// The same names as the GPU kernels of cuda/carafe_kernels.cu, prefixed host_ (host_traffic_ when tracing); the
// channels_last (_nhwc_) ones take one more argument, masks_nhwc.
#define HOST_EXPORT_KI(T, SUFFIX, K, KNAME, I, INAME)                                                   \
  HOST_KERNEL(carafe_forward_##KNAME##_##INAME##_##SUFFIX, forward, K, I, T)                            \
  HOST_KERNEL(carafe_backward_features_##KNAME##_##INAME##_##SUFFIX, backward_features, K, I, T)        \
  HOST_KERNEL(carafe_backward_masks_##KNAME##_##INAME##_##SUFFIX, backward_masks, K, I, T)              \
  HOST_NHWC_KERNEL(carafe_forward_##KNAME##_##INAME##_nhwc_##SUFFIX, forward, K, I, T)                  \
  HOST_NHWC_KERNEL(carafe_backward_features_##KNAME##_##INAME##_nhwc_##SUFFIX, backward_features, K, I, T) \
  HOST_NHWC_MASKS_KERNEL(carafe_backward_masks_##KNAME##_##INAME##_nhwc_##SUFFIX, K, I, T)
#define HOST_EXPORT_K(T, SUFFIX, K, KNAME) \
  HOST_EXPORT_KI(T, SUFFIX, K, KNAME, int, i32) HOST_EXPORT_KI(T, SUFFIX, K, KNAME, long long, i64)
#define HOST_EXPORT(T, SUFFIX)                                                                          \
  HOST_EXPORT_K(T, SUFFIX, 1, k1) HOST_EXPORT_K(T, SUFFIX, 3, k3) HOST_EXPORT_K(T, SUFFIX, 5, k5)       \
  HOST_EXPORT_K(T, SUFFIX, 7, k7) HOST_EXPORT_K(T, SUFFIX, 0, kx)

HOST_EXPORT(double, f64)
HOST_EXPORT(float, f32)
HOST_EXPORT(carafe::HostHalf, f16)
HOST_EXPORT(carafe::HostBFloat16, bf16)
