// CARAFE / CARAFE++ reassembly: the per-thread work of the forward pass and of both gradients.
//
// Every tensor is NCHW-contiguous (the loader makes it so):
//   x    [N, C,     H,  W ]   input features
//   m    [N, G*k*k, Ho, Wo]   reassembly kernels, tap (ky, kx) of group g at channel g*k*k + ky*k + kx
//   out  [N, C,     Ho, Wo]
// Output (p, q) reassembles the k x k window of x centred at (cy, cx): up (sigma-fold upsampling) cy = p / sigma,
// down (CARAFE++) cy = p * sigma. Taps outside x contribute zero. Channel c belongs to group c / (C / G).
//
// Each function below is the body of one GPU thread for one work item; work items are numbered so that the
// innermost (fastest-varying) index is the image column, which makes a warp's loads and stores contiguous.
// Sizes are run-time arguments (never baked per shape); offsets are 64-bit.
//
// The feature gradient is a gather: each input element sums over the outputs that read it, so no two threads write
// the same memory, no atomics are needed and the result is bitwise reproducible.
//
// This header is plain C++ apart from the CARAFE_HD qualifier, so the same functions also compile on the host
// (tests/cuda_host_harness.cpp checks them against the reference on machines without a GPU).

#pragma once

#if defined(__CUDACC__)
#define CARAFE_HD __host__ __device__ __forceinline__
#else
#define CARAFE_HD inline
#endif

namespace carafe {

typedef long long index_t;

// Channels handled by one thread in the forward pass and the feature gradient: each mask value loaded is reused
// for this many channels of its group.
constexpr int kChannelsPerThread = 4;
// Taps handled by one thread in the mask gradient: each output-gradient value loaded is reused for this many taps.
constexpr int kTapsPerThread = 16;

// Accumulation type: float for fp32/fp16/bf16 inputs, double for fp64.
template <typename T>
struct Accumulator {
  typedef float type;
};
template <>
struct Accumulator<double> {
  typedef double type;
};

// Every global-memory access of the kernels goes through load() / store(), so the host harness can record the
// addresses a thread block touches (tests/cuda_host_harness.cpp built with CARAFE_TRACE: the memory-traffic model
// of scripts/bench_cuda_static.py). On the GPU they are plain loads and stores.
#if defined(CARAFE_TRACE)
void carafe_trace_read(const void* address);
void carafe_trace_write(const void* address);
template <typename T>
inline T load(const T* p) {
  carafe_trace_read(p);
  return T();
}
template <typename T>
inline void store(T* p, T) {
  carafe_trace_write(p);
}
#else
template <typename T>
CARAFE_HD T load(const T* p) {
  return *p;
}
template <typename T>
CARAFE_HD void store(T* p, T v) {
  *p = v;
}
#endif

CARAFE_HD float to_acc(float v) { return v; }
CARAFE_HD double to_acc(double v) { return v; }
CARAFE_HD void from_acc(float v, float* dst) { store(dst, v); }
CARAFE_HD void from_acc(double v, double* dst) { store(dst, v); }
#if defined(__CUDACC__)
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_acc(float v, __half* dst) { store(dst, __float2half_rn(v)); }
__device__ __forceinline__ void from_acc(float v, __nv_bfloat16* dst) { store(dst, __float2bfloat16_rn(v)); }
#endif

CARAFE_HD index_t min_index(index_t a, index_t b) { return a < b ? a : b; }

// a / b and a % b for non-negative a and positive b; 32-bit division (several times cheaper on the GPU) whenever
// both fit, which is every realistic size, and 64-bit otherwise.
CARAFE_HD index_t divide(index_t a, index_t b) {
  if (((a | b) >> 31) == 0) return static_cast<index_t>(static_cast<unsigned>(a) / static_cast<unsigned>(b));
  return a / b;
}
CARAFE_HD index_t modulo(index_t a, index_t b) { return a - divide(a, b) * b; }

struct Geometry {
  index_t n, c, h, w, out_h, out_w, k, groups, sigma;
  bool up;

  CARAFE_HD index_t radius() const { return k / 2; }
  CARAFE_HD index_t taps() const { return k * k; }
  CARAFE_HD index_t group_channels() const { return divide(c, groups); }
  CARAFE_HD index_t mask_channels() const { return groups * k * k; }
  CARAFE_HD index_t channel_chunks() const { return (group_channels() + kChannelsPerThread - 1) / kChannelsPerThread; }
  CARAFE_HD index_t tap_chunks() const { return (taps() + kTapsPerThread - 1) / kTapsPerThread; }
  CARAFE_HD index_t centre(index_t out_index) const { return up ? divide(out_index, sigma) : out_index * sigma; }
  // Output indices [lo, hi) along an axis of length out_len whose reassembly centre is input index `centre`:
  // up [centre * sigma, centre * sigma + sigma), down {centre / sigma} if sigma divides centre.
  CARAFE_HD void outputs_centred_at(index_t centre, index_t out_len, index_t* lo, index_t* hi) const {
    if (up) {
      *lo = centre * sigma;
      *hi = min_index(*lo + sigma, out_len);
    } else if (modulo(centre, sigma) == 0 && divide(centre, sigma) < out_len) {
      *lo = divide(centre, sigma);
      *hi = *lo + 1;
    } else {
      *lo = *hi = 0;
    }
  }

  // Work item counts of the three passes.
  CARAFE_HD index_t forward_items() const { return n * groups * channel_chunks() * out_h * out_w; }
  CARAFE_HD index_t backward_features_items() const { return n * groups * channel_chunks() * h * w; }
  CARAFE_HD index_t backward_masks_items() const { return n * groups * tap_chunks() * out_h * out_w; }
};

// Geometry from the kernels' scalar arguments (the order every exported kernel uses after its three pointers).
CARAFE_HD Geometry make_geometry(index_t n, index_t c, index_t h, index_t w, index_t out_h, index_t out_w, index_t k,
                                 index_t groups, index_t sigma, index_t up) {
  Geometry g;
  g.n = n;
  g.c = c;
  g.h = h;
  g.w = w;
  g.out_h = out_h;
  g.out_w = out_w;
  g.k = k;
  g.groups = groups;
  g.sigma = sigma;
  g.up = up != 0;
  return g;
}

#define CARAFE_GEOMETRY_PARAMS                                                                                    \
  long long n, long long c, long long h, long long w, long long out_h, long long out_w, long long k,              \
      long long groups, long long sigma, long long up
#define CARAFE_GEOMETRY carafe::make_geometry(n, c, h, w, out_h, out_w, k, groups, sigma, up)

// A work item of the forward pass and the feature gradient: image n, group grp, channels
// [first_channel, first_channel + channels) of that group, pixel (row, col) of a plane of the given width/height.
struct ChannelItem {
  index_t n, grp, first_channel, channels, row, col;
};

CARAFE_HD ChannelItem channel_item(const Geometry& g, index_t item, index_t height, index_t width) {
  ChannelItem it;
  index_t rest = divide(item, width);
  it.col = item - rest * width;
  item = rest;
  rest = divide(item, height);
  it.row = item - rest * height;
  item = rest;
  rest = divide(item, g.channel_chunks());
  const index_t chunk = item - rest * g.channel_chunks();
  item = rest;
  it.n = divide(item, g.groups);
  it.grp = item - it.n * g.groups;
  const index_t cg = g.group_channels();
  it.first_channel = it.grp * cg + chunk * kChannelsPerThread;
  it.channels = min_index(kChannelsPerThread, cg - chunk * kChannelsPerThread);
  return it;
}

// out[n, c, p, q] for the channels of one work item.
template <typename T>
CARAFE_HD void forward_item(const Geometry& g, index_t item, const T* __restrict__ x, const T* __restrict__ m,
                            T* __restrict__ out) {
  typedef typename Accumulator<T>::type Acc;
  const ChannelItem it = channel_item(g, item, g.out_h, g.out_w);
  const index_t p = it.row, q = it.col, r = g.radius(), k = g.k;
  const index_t cy = g.centre(p), cx = g.centre(q);
  const index_t in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  const T* mask = m + (it.n * g.mask_channels() + it.grp * g.taps()) * out_plane + p * g.out_w + q;
  const T* xs = x + (it.n * g.c + it.first_channel) * in_plane;
  Acc acc[kChannelsPerThread];
  for (int j = 0; j < kChannelsPerThread; ++j) acc[j] = Acc(0);
  for (index_t ky = 0; ky < k; ++ky) {
    const index_t iy = cy + ky - r;
    if (iy < 0 || iy >= g.h) continue;
    for (index_t kx = 0; kx < k; ++kx) {
      const index_t ix = cx + kx - r;
      if (ix < 0 || ix >= g.w) continue;
      const Acc weight = to_acc(load(mask + (ky * k + kx) * out_plane));
      const T* tap = xs + iy * g.w + ix;
#pragma unroll
      for (int j = 0; j < kChannelsPerThread; ++j) {
        if (j < it.channels) acc[j] += weight * to_acc(load(tap + j * in_plane));
      }
    }
  }
  T* dst = out + (it.n * g.c + it.first_channel) * out_plane + p * g.out_w + q;
#pragma unroll
  for (int j = 0; j < kChannelsPerThread; ++j) {
    if (j < it.channels) from_acc(acc[j], dst + j * out_plane);
  }
}

// grad_x[n, c, iy, ix] = sum over the outputs (p, q) that read input (iy, ix) through tap (ky, kx) of
// grad_out[n, c, p, q] * m[n, grp*k*k + ky*k + kx, p, q], for the channels of one work item.
template <typename T>
CARAFE_HD void backward_features_item(const Geometry& g, index_t item, const T* __restrict__ grad_out,
                                      const T* __restrict__ m, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  const ChannelItem it = channel_item(g, item, g.h, g.w);
  const index_t iy = it.row, ix = it.col, r = g.radius(), k = g.k;
  const index_t in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  const T* masks = m + (it.n * g.mask_channels() + it.grp * g.taps()) * out_plane;
  const T* go = grad_out + (it.n * g.c + it.first_channel) * out_plane;
  Acc acc[kChannelsPerThread];
  for (int j = 0; j < kChannelsPerThread; ++j) acc[j] = Acc(0);
  // Input (iy, ix) is tap (ky, kx) of every output whose centre is (iy - ky + r, ix - kx + r).
  for (index_t ky = 0; ky < k; ++ky) {
    const index_t cy = iy - ky + r;
    if (cy < 0 || cy >= g.h) continue;
    index_t p0, p1;
    g.outputs_centred_at(cy, g.out_h, &p0, &p1);
    for (index_t kx = 0; kx < k; ++kx) {
      const index_t cx = ix - kx + r;
      if (cx < 0 || cx >= g.w) continue;
      index_t q0, q1;
      g.outputs_centred_at(cx, g.out_w, &q0, &q1);
      const T* tap_masks = masks + (ky * k + kx) * out_plane;
      for (index_t p = p0; p < p1; ++p) {
        for (index_t q = q0; q < q1; ++q) {
          const index_t offset = p * g.out_w + q;
          const Acc weight = to_acc(load(tap_masks + offset));
#pragma unroll
          for (int j = 0; j < kChannelsPerThread; ++j) {
            if (j < it.channels) acc[j] += weight * to_acc(load(go + j * out_plane + offset));
          }
        }
      }
    }
  }
  T* dst = grad_x + (it.n * g.c + it.first_channel) * in_plane + iy * g.w + ix;
#pragma unroll
  for (int j = 0; j < kChannelsPerThread; ++j) {
    if (j < it.channels) from_acc(acc[j], dst + j * in_plane);
  }
}

// grad_m[n, grp*k*k + t, p, q] = sum over the channels c of group grp of grad_out[n, c, p, q] * x[n, c, tap t],
// for up to kTapsPerThread consecutive taps t of one output location.
template <typename T>
CARAFE_HD void backward_masks_item(const Geometry& g, index_t item, const T* __restrict__ grad_out,
                                   const T* __restrict__ x, T* __restrict__ grad_m) {
  typedef typename Accumulator<T>::type Acc;
  index_t rest = divide(item, g.out_w);
  const index_t q = item - rest * g.out_w;
  item = rest;
  rest = divide(item, g.out_h);
  const index_t p = item - rest * g.out_h;
  item = rest;
  rest = divide(item, g.tap_chunks());
  const index_t first_tap = (item - rest * g.tap_chunks()) * kTapsPerThread;
  item = rest;
  const index_t n = divide(item, g.groups);
  const index_t grp = item - n * g.groups;
  const index_t r = g.radius(), k = g.k, kk = g.taps(), cg = g.group_channels();
  const index_t cy = g.centre(p), cx = g.centre(q);
  const index_t in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  // Offset of each tap inside an input plane, or -1 when the tap lies outside the map (or past the last tap).
  index_t offsets[kTapsPerThread];
  Acc acc[kTapsPerThread];
#pragma unroll
  for (int j = 0; j < kTapsPerThread; ++j) {
    const index_t t = first_tap + j, ty = divide(t, k), iy = cy + ty - r, ix = cx + (t - ty * k) - r;
    const bool inside = t < kk && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
    offsets[j] = inside ? iy * g.w + ix : -1;
    acc[j] = Acc(0);
  }
  const index_t first_channel = n * g.c + grp * cg;
  const T* go = grad_out + first_channel * out_plane + p * g.out_w + q;
  const T* xs = x + first_channel * in_plane;
  for (index_t c = 0; c < cg; ++c) {
    const Acc grad = to_acc(load(go + c * out_plane));
    const T* plane = xs + c * in_plane;
#pragma unroll
    for (int j = 0; j < kTapsPerThread; ++j) {
      if (offsets[j] >= 0) acc[j] += grad * to_acc(load(plane + offsets[j]));
    }
  }
  T* dst = grad_m + (n * g.mask_channels() + grp * kk + first_tap) * out_plane + p * g.out_w + q;
#pragma unroll
  for (int j = 0; j < kTapsPerThread; ++j) {
    if (first_tap + j < kk) from_acc(acc[j], dst + j * out_plane);
  }
}

}  // namespace carafe
