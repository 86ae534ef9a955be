// CARAFE / CARAFE++ reassembly: the per-thread work of the forward pass and of both gradients.
//
// The passes below take NCHW-contiguous tensors (the channels_last twins are at the end of the file):
//   x    [N, C,     H,  W ]   input features
//   m    [N, G*k*k, Ho, Wo]   reassembly kernels, tap (ky, kx) of group g at channel g*k*k + ky*k + kx
//   out  [N, C,     Ho, Wo]
// Output (p, q) reassembles the k x k window of x centred at (cy, cx): up (sigma-fold upsampling) cy = p / sigma,
// down (CARAFE++) cy = p * sigma. Taps outside x contribute zero. Channel c belongs to group c / (C / G).
//
// Each function below is the body of one GPU thread for one work item; work items are numbered so that the
// innermost (fastest-varying) index is the image column, which makes a warp's loads and stores contiguous.
// Sizes are run-time arguments (never baked per shape). Two things are compile-time parameters, chosen by the
// loader (carafe/backends/cuda.py) per call:
//   K  the kernel size for K in {1, 3, 5, 7} (fully unrolled taps, weights in registers); K = 0 is the run-time
//      path for every other size;
//   I  the index type: int when every offset of the call fits in 31 bits (the loader checks), long long otherwise.
//
// Work split, per pass (the loader's work_items() mirrors it):
//   forward, K > 0        mask-stationary: one thread per output pixel and channel slice keeps the pixel's k*k
//                         weights in registers and loops over the slice's channels (slices = 1 reads every mask
//                         value once; the loader raises it only to fill the GPU);
//   forward, K = 0        one thread per output pixel and kChannelsPerThread channels, taps in a run-time loop;
//   backward_features     one thread per input pixel and kGradChannelsPerThread channels (a gather: each input
//                         element sums over the outputs that read it, so no atomics and bitwise reproducible);
//   backward_masks, K > 0 one thread per output pixel keeps all k*k tap sums in registers and loops over the
//                         group's channels (each output-gradient value is read once);
//   backward_masks, K = 0 one thread per output pixel and kTapsPerThread taps.
// Interior pixels (the whole window inside the map) take a path without per-tap predicates; border pixels test
// each tap.
//
// This header is plain C++ apart from the CARAFE_HD qualifier, so the same functions also compile on the host
// (tests/cuda_host_harness.cpp checks them against the reference on machines without a GPU, in every dtype).

#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define CARAFE_HD __host__ __device__ __forceinline__
#else
#define CARAFE_HD inline
#endif

namespace carafe {

// Channels handled by one thread of the run-time-k forward pass: each mask value loaded is reused this many times.
inline constexpr int kChannelsPerThread = 4;
// Channels handled by one thread of the feature gradient: each mask value loaded is reused this many times.
inline constexpr int kGradChannelsPerThread = 16;
// Taps handled by one thread of the run-time-k mask gradient.
inline constexpr int kTapsPerThread = 16;

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

// Accumulation type: float for fp32/fp16/bf16 inputs, double for fp64.
template <typename T>
struct Accumulator {
  typedef float type;
};
template <>
struct Accumulator<double> {
  typedef double type;
};

// Conversions between a storage type and its accumulation type: the identity for float / double; the kernel file
// specializes Convert for __half / __nv_bfloat16 on the GPU, the host harness for its host types that round the
// same way.
template <typename T>
struct Convert {
  CARAFE_HD static typename Accumulator<T>::type widen(T v) { return v; }
  CARAFE_HD static T narrow(typename Accumulator<T>::type v) { return v; }
};
template <typename T>
CARAFE_HD typename Accumulator<T>::type to_acc(T v) {
  return Convert<T>::widen(v);
}
template <typename T>
CARAFE_HD void from_acc(typename Accumulator<T>::type v, T* dst) {
  store(dst, Convert<T>::narrow(v));
}

// Keeps the compiler from hoisting the loads of later tap rows above this point: a thread then has at most one row
// of K loads in flight, which keeps the K*K-register kernels within the register budget of 4 blocks per SM (warps,
// not a thread's loads, hide the latency).
#if defined(__CUDA_ARCH__)
#define CARAFE_ROW_BARRIER() asm volatile("" ::: "memory")
#else
#define CARAFE_ROW_BARRIER() ((void)0)
#endif

template <typename I>
CARAFE_HD I min_index(I a, I b) {
  return a < b ? a : b;
}

// a / b for non-negative a and positive b: 32-bit unsigned division (several times cheaper on the GPU) whenever
// both fit, which is every realistic size.
CARAFE_HD int divide(int a, int b) { return static_cast<int>(static_cast<unsigned>(a) / static_cast<unsigned>(b)); }
CARAFE_HD long long divide(long long a, long long b) {
  if (((a | b) >> 31) == 0) return static_cast<long long>(static_cast<unsigned>(a) / static_cast<unsigned>(b));
  return a / b;
}
template <typename I>
CARAFE_HD I modulo(I a, I b) {
  return a - divide(a, b) * b;
}

template <typename I>
struct Geometry {
  I n, c, h, w, out_h, out_w, k, groups, sigma, slices;
  bool up;
  bool masks_nhwc;  // the channels_last kernels only: masks (and their gradient) are [N, Ho, Wo, G*k*k]

  CARAFE_HD I radius() const { return k / 2; }
  CARAFE_HD I taps() const { return k * k; }
  CARAFE_HD I group_channels() const { return divide(c, groups); }
  CARAFE_HD I mask_channels() const { return groups * k * k; }
  CARAFE_HD I channel_chunks(I per_thread) const { return (group_channels() + per_thread - 1) / per_thread; }
  CARAFE_HD I slice_channels() const { return (group_channels() + slices - 1) / slices; }
  CARAFE_HD I tap_chunks() const { return (taps() + kTapsPerThread - 1) / kTapsPerThread; }
  CARAFE_HD I centre(I out_index) const { return up ? divide(out_index, sigma) : out_index * sigma; }
  // Output indices [lo, hi) along an axis of length out_len whose reassembly centre is input index `centre`:
  // up [centre * sigma, centre * sigma + sigma), down {centre / sigma} if sigma divides centre.
  CARAFE_HD void outputs_centred_at(I centre, I out_len, I* lo, I* hi) const {
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

  // Work item counts of the passes (K > 0: the fixed-size kernels; K = 0: the run-time path).
  CARAFE_HD I forward_items(int K) const {
    return n * groups * (K > 0 ? slices : channel_chunks(kChannelsPerThread)) * out_h * out_w;
  }
  CARAFE_HD I backward_features_items(int) const { return n * groups * channel_chunks(kGradChannelsPerThread) * h * w; }
  CARAFE_HD I backward_masks_items(int K) const { return n * groups * (K > 0 ? 1 : tap_chunks()) * out_h * out_w; }
};

// Geometry from the kernels' scalar arguments (the order every exported kernel uses after its three pointers).
template <typename I>
CARAFE_HD Geometry<I> make_geometry(long long n, long long c, long long h, long long w, long long out_h,
                                    long long out_w, long long k, long long groups, long long sigma, long long up,
                                    long long slices) {
  Geometry<I> g;
  g.n = static_cast<I>(n);
  g.c = static_cast<I>(c);
  g.h = static_cast<I>(h);
  g.w = static_cast<I>(w);
  g.out_h = static_cast<I>(out_h);
  g.out_w = static_cast<I>(out_w);
  g.k = static_cast<I>(k);
  g.groups = static_cast<I>(groups);
  g.sigma = static_cast<I>(sigma);
  g.slices = static_cast<I>(slices);
  g.up = up != 0;
  g.masks_nhwc = false;
  return g;
}

#define CARAFE_GEOMETRY_PARAMS                                                                                    \
  long long n, long long c, long long h, long long w, long long out_h, long long out_w, long long k,              \
      long long groups, long long sigma, long long up, long long slices
#define CARAFE_GEOMETRY(I) carafe::make_geometry<I>(n, c, h, w, out_h, out_w, k, groups, sigma, up, slices)

// A work item numbered (n, grp, chunk, row, col), col fastest: image n, group grp, chunk `chunk` of `chunks` of the
// group's channels, pixel (row, col) of a plane of the given height and width.
template <typename I>
struct PixelItem {
  I n, grp, chunk, row, col;
};

template <typename I>
CARAFE_HD PixelItem<I> pixel_item(const Geometry<I>& g, I item, I chunks, I height, I width) {
  PixelItem<I> it;
  I rest = divide(item, width);
  it.col = item - rest * width;
  item = rest;
  rest = divide(item, height);
  it.row = item - rest * height;
  item = rest;
  rest = divide(item, chunks);
  it.chunk = item - rest * chunks;
  item = rest;
  it.n = divide(item, g.groups);
  it.grp = item - it.n * g.groups;
  return it;
}

// ---- forward ------------------------------------------------------------------------------------------------------

// Run-time k: out[n, c, p, q] for kChannelsPerThread channels of one output pixel.
template <typename T, typename I>
CARAFE_HD void forward_item_runtime(const Geometry<I>& g, I item, const T* __restrict__ x, const T* __restrict__ m,
                                    T* __restrict__ out) {
  typedef typename Accumulator<T>::type Acc;
  const PixelItem<I> it = pixel_item(g, item, g.channel_chunks(kChannelsPerThread), g.out_h, g.out_w);
  const I p = it.row, q = it.col, r = g.radius(), k = g.k, cg = g.group_channels();
  const I first_channel = it.grp * cg + it.chunk * kChannelsPerThread;
  const I channels = min_index(I(kChannelsPerThread), cg - it.chunk * kChannelsPerThread);
  const I cy = g.centre(p), cx = g.centre(q);
  const I in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  const T* mask = m + (it.n * g.mask_channels() + it.grp * g.taps()) * out_plane + p * g.out_w + q;
  const T* xs = x + (it.n * g.c + first_channel) * in_plane;
  Acc acc[kChannelsPerThread];
  for (int j = 0; j < kChannelsPerThread; ++j) acc[j] = Acc(0);
  for (I ky = 0; ky < k; ++ky) {
    const I iy = cy + ky - r;
    if (iy < 0 || iy >= g.h) continue;
    for (I kx = 0; kx < k; ++kx) {
      const I ix = cx + kx - r;
      if (ix < 0 || ix >= g.w) continue;
      const Acc weight = to_acc(load(mask + (ky * k + kx) * out_plane));
      const T* tap = xs + iy * g.w + ix;
#pragma unroll
      for (int j = 0; j < kChannelsPerThread; ++j) {
        if (j < channels) acc[j] += weight * to_acc(load(tap + j * in_plane));
      }
    }
  }
  T* dst = out + (it.n * g.c + first_channel) * out_plane + p * g.out_w + q;
#pragma unroll
  for (int j = 0; j < kChannelsPerThread; ++j) {
    if (j < channels) from_acc(acc[j], dst + j * out_plane);
  }
}

// Window rows / columns inside the map: bit d set when row / column d of the K x K window centred at (cy, cx) is.
template <int K, typename I>
CARAFE_HD void window_bits(const Geometry<I>& g, I cy, I cx, unsigned* rows, unsigned* cols) {
  constexpr int R = K / 2;
  *rows = 0;
  *cols = 0;
#pragma unroll
  for (int d = 0; d < K; ++d) {
    *rows |= (cy + d - R >= 0 && cy + d - R < g.h) ? 1u << d : 0u;
    *cols |= (cx + d - R >= 0 && cx + d - R < g.w) ? 1u << d : 0u;
  }
}

// k = K: out[n, c, p, q] for every channel of one slice of a group, the pixel's K*K weights held in registers.
template <int K, typename T, typename I>
CARAFE_HD void forward_item_fixed(const Geometry<I>& g, I item, const T* __restrict__ x, const T* __restrict__ m,
                                  T* __restrict__ out) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = K / 2;
  const PixelItem<I> it = pixel_item(g, item, g.slices, g.out_h, g.out_w);
  const I p = it.row, q = it.col, cs = g.slice_channels(), cg = g.group_channels();
  const I first = it.chunk * cs, count = min_index(cs, cg - first);  // the slice's channels of the group
  const I cy = g.centre(p), cx = g.centre(q);
  const I in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  const T* mask = m + (it.n * g.groups + it.grp) * (K * K) * out_plane + p * g.out_w + q;
  Acc weight[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) weight[t] = to_acc(load(mask + t * out_plane));
  const I first_channel = it.n * g.c + it.grp * cg + first;
  const T* xs = x + first_channel * in_plane + (cy - R) * g.w + (cx - R);  // tap (0, 0) of the first channel
  T* dst = out + first_channel * out_plane + p * g.out_w + q;
  if (cy >= R && cy + R < g.h && cx >= R && cx + R < g.w) {
    // The whole window is inside the map: no per-tap test; the column offsets are compile-time constants.
    for (I c = 0; c < count; ++c) {
      Acc acc = Acc(0);
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        const T* row = xs + ky * g.w;
#pragma unroll
        for (int kx = 0; kx < K; ++kx) acc += weight[ky * K + kx] * to_acc(load(row + kx));
      }
      from_acc(acc, dst);
      xs += in_plane;
      dst += out_plane;
    }
  } else {
    unsigned rows, cols;
    window_bits<K>(g, cy, cx, &rows, &cols);
    for (I c = 0; c < count; ++c) {
      Acc acc = Acc(0);
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        if (!((rows >> ky) & 1u)) continue;
        const T* row = xs + ky * g.w;
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
          if ((cols >> kx) & 1u) acc += weight[ky * K + kx] * to_acc(load(row + kx));
        }
      }
      from_acc(acc, dst);
      xs += in_plane;
      dst += out_plane;
    }
  }
}

template <int K, typename T, typename I>
CARAFE_HD void forward_item(const Geometry<I>& g, I item, const T* __restrict__ x, const T* __restrict__ m,
                            T* __restrict__ out) {
  if constexpr (K > 0) {
    forward_item_fixed<K>(g, item, x, m, out);
  } else {
    forward_item_runtime(g, item, x, m, out);
  }
}

// ---- feature gradient ---------------------------------------------------------------------------------------------

// acc[j] += weight * grad_out at channel + j * stride, for the J channels of a feature-gradient thread (kPartial:
// only j < channels, a test per channel; without it the loop has none).
template <int J, bool kPartial, typename T, typename I, typename Acc>
CARAFE_HD void gather_channels(Acc* acc, Acc weight, const T* __restrict__ channel, I stride, I channels) {
#pragma unroll
  for (int j = 0; j < J; ++j) {
    if (!kPartial || j < channels) acc[j] += weight * to_acc(load(channel));
    channel += stride;  // one add per load, no per-channel address
  }
}

// Where the k*k masks of (n, grp, p, q) start, and the distance between consecutive taps, in either mask layout.
template <typename I>
CARAFE_HD I mask_offset(const Geometry<I>& g, I n, I grp, I p, I q) {
  return g.masks_nhwc ? ((n * g.out_h + p) * g.out_w + q) * g.mask_channels() + grp * g.taps()
                      : (((n * g.groups + grp) * g.taps()) * g.out_h + p) * g.out_w + q;
}
template <typename I>
CARAFE_HD I mask_tap_stride(const Geometry<I>& g) {
  return g.masks_nhwc ? I(1) : g.out_h * g.out_w;
}
// The distance between the masks of horizontally adjacent output pixels.
template <typename I>
CARAFE_HD I mask_column_stride(const Geometry<I>& g) {
  return g.masks_nhwc ? g.mask_channels() : I(1);
}

// The taps of a feature-gradient thread (both layouts): input (iy, ix) is tap (ky, kx) of every output whose centre
// is (iy - ky + r, ix - kx + r), and acc[j] gathers the thread's channel j of each such output, j < channels. NCHW
// (kNhwc false): the mask of tap t at masks + t * out_plane + p * out_w + q, channel j at go + j * out_plane +
// p * out_w + q. NHWC: the masks as mask_offset lays them out, channel j at go + (p * out_w + q) * c + j * L. The
// layout is a template parameter, so the NCHW strides are constants (1) where they were before. The tap loops stay
// rolled (unrolled, their sigma^2-output bodies make very long code for little gain).
template <int K, int J, int L, bool kNhwc, bool kPartial, typename T, typename I, typename Acc>
CARAFE_HD void backward_features_taps(const Geometry<I>& g, I iy, I ix, const T* __restrict__ masks,
                                      const T* __restrict__ go, I channels, Acc* acc) {
  const I k = K > 0 ? I(K) : g.k, r = k / 2, out_plane = g.out_h * g.out_w;
  const I tap_stride = kNhwc ? mask_tap_stride(g) : out_plane;
  const I mask_col = kNhwc ? mask_column_stride(g) : I(1), mask_row = mask_col * g.out_w;
  const I go_col = g.c, go_row = go_col * g.out_w;  // NHWC only
  const I channel_stride = kNhwc ? I(L) : out_plane;
#pragma unroll 1
  for (I ky = 0; ky < k; ++ky) {
    const I cy = iy - ky + r;
    if (cy < 0 || cy >= g.h) continue;
    I p0, p1;
    g.outputs_centred_at(cy, g.out_h, &p0, &p1);
#pragma unroll 1
    for (I kx = 0; kx < k; ++kx) {
      const I cx = ix - kx + r;
      if (cx < 0 || cx >= g.w) continue;
      I q0, q1;
      g.outputs_centred_at(cx, g.out_w, &q0, &q1);
      const T* tap_masks = masks + (ky * k + kx) * tap_stride;
      for (I p = p0; p < p1; ++p) {
        for (I q = q0; q < q1; ++q) {
          const I mask_at = p * mask_row + q * mask_col;
          const I go_at = kNhwc ? p * go_row + q * go_col : mask_at;  // NCHW: one offset for both
          gather_channels<J, kPartial>(acc, to_acc(load(tap_masks + mask_at)), go + go_at, channel_stride, channels);
        }
      }
    }
  }
}

// grad_x[n, c, iy, ix] = sum over the outputs (p, q) that read input (iy, ix) through tap (ky, kx) of
// grad_out[n, c, p, q] * m[n, grp*k*k + ky*k + kx, p, q], for kGradChannelsPerThread channels of one input pixel.
// K > 0 fixes k = K; K = 0 loops over g.k taps. A thread whose chunk is full (every chunk when the group's channels
// are a multiple of kGradChannelsPerThread) runs the loops without per-channel tests.
template <int K, typename T, typename I>
CARAFE_HD void backward_features_item(const Geometry<I>& g, I item, const T* __restrict__ grad_out,
                                      const T* __restrict__ m, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int J = kGradChannelsPerThread;
  const PixelItem<I> it = pixel_item(g, item, g.channel_chunks(J), g.h, g.w);
  const I k = K > 0 ? I(K) : g.k, cg = g.group_channels();
  const I iy = it.row, ix = it.col;
  const I first_channel = it.n * g.c + it.grp * cg + it.chunk * J;
  const I channels = min_index(I(J), cg - it.chunk * J);
  const I in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  const T* masks = m + (it.n * g.groups + it.grp) * (k * k) * out_plane;
  const T* go = grad_out + first_channel * out_plane;
  Acc acc[J];
#pragma unroll
  for (int j = 0; j < J; ++j) acc[j] = Acc(0);
  if (channels == J) {
    backward_features_taps<K, J, 1, false, false>(g, iy, ix, masks, go, channels, acc);
  } else {
    backward_features_taps<K, J, 1, false, true>(g, iy, ix, masks, go, channels, acc);
  }
  T* dst = grad_x + first_channel * in_plane + iy * g.w + ix;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    if (j < channels) from_acc(acc[j], dst + j * in_plane);
  }
}

// ---- mask gradient ------------------------------------------------------------------------------------------------

// Run-time k: grad_m[n, grp*k*k + t, p, q] = sum over the channels c of group grp of grad_out[n, c, p, q] *
// x[n, c, tap t], for up to kTapsPerThread consecutive taps t of one output location.
template <typename T, typename I>
CARAFE_HD void backward_masks_item_runtime(const Geometry<I>& g, I item, const T* __restrict__ grad_out,
                                           const T* __restrict__ x, T* __restrict__ grad_m) {
  typedef typename Accumulator<T>::type Acc;
  const PixelItem<I> it = pixel_item(g, item, g.tap_chunks(), g.out_h, g.out_w);
  const I p = it.row, q = it.col, first_tap = it.chunk * kTapsPerThread;
  const I r = g.radius(), k = g.k, kk = g.taps(), cg = g.group_channels();
  const I cy = g.centre(p), cx = g.centre(q);
  const I in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  // Offset of each tap inside an input plane, or -1 when the tap lies outside the map (or past the last tap).
  I offsets[kTapsPerThread];
  Acc acc[kTapsPerThread];
#pragma unroll
  for (int j = 0; j < kTapsPerThread; ++j) {
    const I t = first_tap + j, ty = divide(t, k), iy = cy + ty - r, ix = cx + (t - ty * k) - r;
    const bool inside = t < kk && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
    offsets[j] = inside ? iy * g.w + ix : I(-1);
    acc[j] = Acc(0);
  }
  const I first_channel = it.n * g.c + it.grp * cg;
  const T* go = grad_out + first_channel * out_plane + p * g.out_w + q;
  const T* xs = x + first_channel * in_plane;
  for (I c = 0; c < cg; ++c) {
    const Acc grad = to_acc(load(go + c * out_plane));
    const T* plane = xs + c * in_plane;
#pragma unroll
    for (int j = 0; j < kTapsPerThread; ++j) {
      if (offsets[j] >= 0) acc[j] += grad * to_acc(load(plane + offsets[j]));
    }
  }
  T* dst = grad_m + (it.n * g.mask_channels() + it.grp * kk + first_tap) * out_plane + p * g.out_w + q;
#pragma unroll
  for (int j = 0; j < kTapsPerThread; ++j) {
    if (first_tap + j < kk) from_acc(acc[j], dst + j * out_plane);
  }
}

// k = K: all K*K taps of one output location, their sums in registers, looping over the group's channels.
template <int K, typename T, typename I>
CARAFE_HD void backward_masks_item_fixed(const Geometry<I>& g, I item, const T* __restrict__ grad_out,
                                         const T* __restrict__ x, T* __restrict__ grad_m) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int R = K / 2;
  const PixelItem<I> it = pixel_item(g, item, I(1), g.out_h, g.out_w);
  const I p = it.row, q = it.col, cg = g.group_channels();
  const I cy = g.centre(p), cx = g.centre(q);
  const I in_plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  const I first_channel = it.n * g.c + it.grp * cg;
  const T* go = grad_out + first_channel * out_plane + p * g.out_w + q;
  const T* xs = x + first_channel * in_plane + (cy - R) * g.w + (cx - R);  // tap (0, 0) of the first channel
  Acc acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = Acc(0);
  if (cy >= R && cy + R < g.h && cx >= R && cx + R < g.w) {
    for (I c = 0; c < cg; ++c) {
      const Acc grad = to_acc(load(go));
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        const T* row = xs + ky * g.w;
#pragma unroll
        for (int kx = 0; kx < K; ++kx) acc[ky * K + kx] += grad * to_acc(load(row + kx));
        CARAFE_ROW_BARRIER();
      }
      go += out_plane;
      xs += in_plane;
    }
  } else {
    unsigned rows, cols;
    window_bits<K>(g, cy, cx, &rows, &cols);
    for (I c = 0; c < cg; ++c) {
      const Acc grad = to_acc(load(go));
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        if (!((rows >> ky) & 1u)) continue;
        const T* row = xs + ky * g.w;
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
          if ((cols >> kx) & 1u) acc[ky * K + kx] += grad * to_acc(load(row + kx));
        }
        CARAFE_ROW_BARRIER();
      }
      go += out_plane;
      xs += in_plane;
    }
  }
  T* dst = grad_m + (it.n * g.groups + it.grp) * (K * K) * out_plane + p * g.out_w + q;
#pragma unroll
  for (int t = 0; t < K * K; ++t) from_acc(acc[t], dst + t * out_plane);
}

template <int K, typename T, typename I>
CARAFE_HD void backward_masks_item(const Geometry<I>& g, I item, const T* __restrict__ grad_out,
                                   const T* __restrict__ x, T* __restrict__ grad_m) {
  if constexpr (K > 0) {
    backward_masks_item_fixed<K>(g, item, grad_out, x, grad_m);
  } else {
    backward_masks_item_runtime(g, item, grad_out, x, grad_m);
  }
}

// ---- channels_last (NHWC) -----------------------------------------------------------------------------------------
//
// The same three passes on channels_last tensors, read and written in place (no transposes):
//   x              memory order [N, H,  W,  C]  (the logical shape stays [N, C, H, W])
//   out, grad_out  memory order [N, Ho, Wo, C]
//   m, grad_m      memory order [N, Ho, Wo, G*k*k] when g.masks_nhwc, else NCHW as above: masks come in either
//                  layout (a thread reads its pixel's k*k weights once, so the layout costs nothing in the loops),
//                  and their gradient is written in the masks' layout.
// Adjacent threads own adjacent channels: a work item is (pixel, group, chunk, lane), lane fastest, and lane l of
// the L = nhwc_lanes<T>() lanes of a pixel takes channels l, l + L, l + 2L, ... of its group, so one load
// instruction of those L lanes reads one whole 32-byte sector (L = 32 / sizeof(T): 8 fp32, 16 fp16 / bf16 and 4
// fp64 channels). A thread works on blocks of J of its channels (J * L consecutive channels for the L lanes), the
// J loads of a tap at compile-time offsets 0, L, ..., (J - 1) L.
//   forward, K > 0      mask-stationary: the thread keeps its pixel's K*K weights in registers (the L lanes load
//                       the same values: one broadcast) and loops over its blocks; slices > 1 deals a group's
//                       blocks out to more threads (the loader raises it only to fill the GPU);
//   forward, K = 0      the same with the taps in a run-time loop (a weight is re-read for each block);
//   backward_features   a gather as in NCHW: one thread per input pixel, chunk of L * kNhwcGradChannels channels
//                       and lane;
//   backward_masks      each lane sums the products of its own channels for the pixel's taps (all K*K, or
//                       kTapsPerThread of them for K = 0: backward_masks_nhwc_partial); the kernel then adds the L
//                       lanes' partial sums with a butterfly of warp shuffles (every lane ends with the same
//                       totals; the host harness does the same additions in the same order) and each lane stores
//                       the taps t with t % L == lane (backward_masks_nhwc_store).

template <typename T>
CARAFE_HD constexpr int nhwc_lanes() {
  return 32 / static_cast<int>(sizeof(T));
}
// Channels of a forward thread's block, of a feature-gradient thread, and of a mask-gradient thread's block.
inline constexpr int kNhwcForwardChannels = 4;
inline constexpr int kNhwcGradChannels = 8;
inline constexpr int kNhwcMaskChannels = 3;
// Taps (partial sums) a mask-gradient thread holds.
template <int K>
CARAFE_HD constexpr int nhwc_mask_taps() {
  return K > 0 ? K * K : kTapsPerThread;
}


// Work item counts of the channels_last passes (the loader's work_items() mirrors them).
template <int K, typename T, typename I>
CARAFE_HD I forward_nhwc_items(const Geometry<I>& g) {
  return g.n * g.out_h * g.out_w * g.groups * g.slices * nhwc_lanes<T>();
}
template <int K, typename T, typename I>
CARAFE_HD I backward_features_nhwc_items(const Geometry<I>& g) {
  return g.n * g.h * g.w * g.groups * g.channel_chunks(nhwc_lanes<T>() * kNhwcGradChannels) * nhwc_lanes<T>();
}
template <int K, typename T, typename I>
CARAFE_HD I backward_masks_nhwc_items(const Geometry<I>& g) {
  return g.n * g.out_h * g.out_w * g.groups * (K > 0 ? I(1) : g.tap_chunks()) * nhwc_lanes<T>();
}

// A channels_last work item numbered (pixel, grp, chunk, lane), lane fastest; pixel = (n * height + row) * width +
// col.
template <typename I>
struct NhwcItem {
  I lane, chunk, grp, pixel, n, row, col;
};

template <int L, typename I>
CARAFE_HD NhwcItem<I> nhwc_item(const Geometry<I>& g, I item, I chunks, I height, I width) {
  NhwcItem<I> it;
  I rest = divide(item, I(L));
  it.lane = item - rest * L;
  item = rest;
  rest = divide(item, chunks);
  it.chunk = item - rest * chunks;
  item = rest;
  rest = divide(item, g.groups);
  it.grp = item - rest * g.groups;
  it.pixel = rest;
  rest = divide(it.pixel, width);
  it.col = it.pixel - rest * width;
  it.n = divide(rest, height);
  it.row = rest - it.n * height;
  return it;
}

// The forward's output pixels in tiles of kTileRows x kTileCols (row-major inside a tile, tiles row-major; the
// tiles of the last band of rows and of its last column are cut to the map): a block of consecutive work items then
// covers a 2-D patch of outputs, whose input windows overlap in both directions, instead of a strip of one row
// (about a third less input traffic at k = 5, sigma = 2 by the static report's model). A bijection on the pixels
// of each image, so every output is still written by exactly one thread.
inline constexpr int kTileRows = 4;
inline constexpr int kTileCols = 8;
template <int L, typename I>
CARAFE_HD NhwcItem<I> nhwc_tiled_item(const Geometry<I>& g, I item, I chunks, I height, I width) {
  NhwcItem<I> it = nhwc_item<L>(g, item, chunks, height, width);
  const I in_image = it.row * width + it.col;  // the item's rank among the image's pixels
  const I band = divide(in_image, I(kTileRows) * width);
  const I band_rows = min_index(I(kTileRows), height - band * kTileRows);
  const I in_band = in_image - band * (I(kTileRows) * width);
  const I tile = divide(in_band, band_rows * kTileCols);
  const I tile_cols = min_index(I(kTileCols), width - tile * kTileCols);
  const I in_tile = in_band - tile * (band_rows * kTileCols);
  const I tile_row = divide(in_tile, tile_cols);
  it.row = band * kTileRows + tile_row;
  it.col = tile * kTileCols + (in_tile - tile_row * tile_cols);
  it.pixel = (it.n * height + it.row) * width + it.col;
  return it;
}

// One forward block: J channels (at xs + j * L) of the K x K window whose tap (ky, kx) is at xs + ky * row_step +
// kx * col_step, written at dst + j * L. kBorder: only the window rows / columns whose bit is set; kPartial: only
// the channels j with j * L < remaining.
template <int K, int J, int L, bool kBorder, bool kPartial, typename T, typename I, typename Acc>
CARAFE_HD void forward_nhwc_block(const Acc* weight, const T* __restrict__ xs, I row_step, I col_step,
                                  unsigned rows, unsigned cols, I remaining, T* __restrict__ dst) {
  Acc acc[J];
#pragma unroll
  for (int j = 0; j < J; ++j) acc[j] = Acc(0);
#pragma unroll
  for (int ky = 0; ky < K; ++ky) {
    if (kBorder && !((rows >> ky) & 1u)) continue;
    const T* row = xs + ky * row_step;
#pragma unroll
    for (int kx = 0; kx < K; ++kx) {
      if (kBorder && !((cols >> kx) & 1u)) continue;
      const T* tap = row + kx * col_step;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if (!kPartial || j * L < remaining) acc[j] += weight[ky * K + kx] * to_acc(load(tap + j * L));
      }
    }
    CARAFE_ROW_BARRIER();
  }
#pragma unroll
  for (int j = 0; j < J; ++j) {
    if (!kPartial || j * L < remaining) from_acc(acc[j], dst + j * L);
  }
}

// k = K: out[n, p, q, c] for the channels of one lane of a slice of a group, the pixel's K*K weights in registers.
template <int K, typename T, typename I>
CARAFE_HD void forward_nhwc_item_fixed(const Geometry<I>& g, I item, const T* __restrict__ x,
                                       const T* __restrict__ m, T* __restrict__ out) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int L = nhwc_lanes<T>(), J = kNhwcForwardChannels, R = K / 2;
  const NhwcItem<I> it = nhwc_tiled_item<L>(g, item, g.slices, g.out_h, g.out_w);
  const I cg = g.group_channels(), cy = g.centre(it.row), cx = g.centre(it.col);
  const T* mask = m + mask_offset(g, it.n, it.grp, it.row, it.col);
  const I tap_stride = mask_tap_stride(g);
  Acc weight[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) weight[t] = to_acc(load(mask + t * tap_stride));
  const I first = it.chunk * (L * J) + it.lane, step = g.slices * (L * J), channel = it.grp * cg + first;
  const I col_step = g.c, row_step = g.w * g.c;
  const T* xs = x + ((it.n * g.h + cy - R) * g.w + cx - R) * g.c + channel;  // tap (0, 0) of the first channel
  T* dst = out + it.pixel * g.c + channel;
  I remaining = cg - first;  // the thread's channels are first + j * L (j * L < remaining) of this block
  unsigned rows, cols;
  window_bits<K>(g, cy, cx, &rows, &cols);
  if (rows == (1u << K) - 1u && cols == (1u << K) - 1u) {  // the whole window is inside the map: no per-tap test
    for (; remaining > (J - 1) * L; remaining -= step, xs += step, dst += step) {
      forward_nhwc_block<K, J, L, false, false>(weight, xs, row_step, col_step, rows, cols, remaining, dst);
    }
  } else {
    for (; remaining > (J - 1) * L; remaining -= step, xs += step, dst += step) {
      forward_nhwc_block<K, J, L, true, false>(weight, xs, row_step, col_step, rows, cols, remaining, dst);
    }
  }
  // The last, partial block (when the lane's channels do not fill it), with per-tap tests either way.
  if (remaining > 0) forward_nhwc_block<K, J, L, true, true>(weight, xs, row_step, col_step, rows, cols, remaining, dst);
}

// Run-time k: the same, the taps in a run-time loop and each weight read once per block.
template <typename T, typename I>
CARAFE_HD void forward_nhwc_item_runtime(const Geometry<I>& g, I item, const T* __restrict__ x,
                                         const T* __restrict__ m, T* __restrict__ out) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int L = nhwc_lanes<T>(), J = kNhwcForwardChannels;
  const NhwcItem<I> it = nhwc_tiled_item<L>(g, item, g.slices, g.out_h, g.out_w);
  const I k = g.k, r = g.radius(), cg = g.group_channels(), cy = g.centre(it.row), cx = g.centre(it.col);
  const T* mask = m + mask_offset(g, it.n, it.grp, it.row, it.col);
  const I tap_stride = mask_tap_stride(g);
  const I first = it.chunk * (L * J) + it.lane, step = g.slices * (L * J), channel = it.grp * cg + first;
  const T* xs = x + it.n * g.h * g.w * g.c + channel;
  T* dst = out + it.pixel * g.c + channel;
  for (I remaining = cg - first; remaining > 0; remaining -= step, xs += step, dst += step) {
    Acc acc[J];
#pragma unroll
    for (int j = 0; j < J; ++j) acc[j] = Acc(0);
    for (I ky = 0; ky < k; ++ky) {
      const I iy = cy + ky - r;
      if (iy < 0 || iy >= g.h) continue;
      for (I kx = 0; kx < k; ++kx) {
        const I ix = cx + kx - r;
        if (ix < 0 || ix >= g.w) continue;
        const Acc weight = to_acc(load(mask + (ky * k + kx) * tap_stride));
        const T* tap = xs + (iy * g.w + ix) * g.c;
#pragma unroll
        for (int j = 0; j < J; ++j) {
          if (j * L < remaining) acc[j] += weight * to_acc(load(tap + j * L));
        }
      }
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      if (j * L < remaining) from_acc(acc[j], dst + j * L);
    }
  }
}

template <int K, typename T, typename I>
CARAFE_HD void forward_nhwc_item(const Geometry<I>& g, I item, const T* __restrict__ x, const T* __restrict__ m,
                                 T* __restrict__ out) {
  if constexpr (K > 0) {
    forward_nhwc_item_fixed<K>(g, item, x, m, out);
  } else {
    forward_nhwc_item_runtime(g, item, x, m, out);
  }
}


// grad_x[n, iy, ix, c] for the kNhwcGradChannels channels chunk * L * J + j * L + lane of a group (a gather, as
// backward_features_item; a thread whose channels fill its chunk runs without per-channel tests).
template <int K, typename T, typename I>
CARAFE_HD void backward_features_nhwc_item(const Geometry<I>& g, I item, const T* __restrict__ grad_out,
                                           const T* __restrict__ m, T* __restrict__ grad_x) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int L = nhwc_lanes<T>(), J = kNhwcGradChannels;
  const NhwcItem<I> it = nhwc_item<L>(g, item, g.channel_chunks(I(L * J)), g.h, g.w);
  const I cg = g.group_channels();
  const I first = it.chunk * (L * J) + it.lane, channel = it.grp * cg + first;
  const I remaining = cg - first;  // channel + j * L is the thread's for j * L < remaining
  const I channels = remaining > 0 ? (remaining + L - 1) / L : I(0);  // the j with j * L < remaining
  const T* masks = m + mask_offset(g, it.n, it.grp, I(0), I(0));
  const T* go = grad_out + it.n * g.out_h * g.out_w * g.c + channel;
  Acc acc[J];
#pragma unroll
  for (int j = 0; j < J; ++j) acc[j] = Acc(0);
  if (remaining > (J - 1) * L) {
    backward_features_taps<K, J, L, true, false>(g, it.row, it.col, masks, go, channels, acc);
  } else {
    backward_features_taps<K, J, L, true, true>(g, it.row, it.col, masks, go, channels, acc);
  }
  T* dst = grad_x + it.pixel * g.c + channel;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    if (j * L < remaining) from_acc(acc[j], dst + j * L);
  }
}

// One mask-gradient block: the J channels at go + j * L of the output pixel, times the same channels of each tap
// of the window (tap (ky, kx) at xs + ky * row_step + kx * col_step), added to acc[ky * K + kx].
template <int K, int J, int L, bool kBorder, bool kPartial, typename T, typename I, typename Acc>
CARAFE_HD void masks_nhwc_block(Acc* acc, const T* __restrict__ go, const T* __restrict__ xs, I row_step,
                                I col_step, unsigned rows, unsigned cols, I remaining) {
  Acc grad[J];
#pragma unroll
  for (int j = 0; j < J; ++j) grad[j] = (!kPartial || j * L < remaining) ? to_acc(load(go + j * L)) : Acc(0);
#pragma unroll
  for (int ky = 0; ky < K; ++ky) {
    if (kBorder && !((rows >> ky) & 1u)) continue;
    const T* row = xs + ky * row_step;
#pragma unroll
    for (int kx = 0; kx < K; ++kx) {
      if (kBorder && !((cols >> kx) & 1u)) continue;
      const T* tap = row + kx * col_step;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if (!kPartial || j * L < remaining) acc[ky * K + kx] += grad[j] * to_acc(load(tap + j * L));
      }
    }
    CARAFE_ROW_BARRIER();
  }
}

// acc[t] = sum over this lane's channels c (lane, lane + L, ... of the group) of grad_out[n, p, q, c] *
// x[n, tap t of (p, q), c], for the nhwc_mask_taps<K>() taps of the item (all K*K, or kTapsPerThread from
// chunk * kTapsPerThread for K = 0). The L lanes' sums still have to be added (see the section comment).
template <int K, typename T, typename I>
CARAFE_HD void backward_masks_nhwc_partial(const Geometry<I>& g, I item, const T* __restrict__ grad_out,
                                           const T* __restrict__ x, typename Accumulator<T>::type* acc) {
  typedef typename Accumulator<T>::type Acc;
  constexpr int L = nhwc_lanes<T>(), J = kNhwcMaskChannels, TAPS = nhwc_mask_taps<K>();
  const NhwcItem<I> it = nhwc_item<L>(g, item, K > 0 ? I(1) : g.tap_chunks(), g.out_h, g.out_w);
  const I cg = g.group_channels(), cy = g.centre(it.row), cx = g.centre(it.col);
  const I channel = it.grp * cg + it.lane, step = L * J;
  const T* go = grad_out + it.pixel * g.c + channel;
#pragma unroll
  for (int t = 0; t < TAPS; ++t) acc[t] = Acc(0);
  if constexpr (K > 0) {
    constexpr int R = K / 2;
    const I col_step = g.c, row_step = g.w * g.c;
    const T* xs = x + ((it.n * g.h + cy - R) * g.w + cx - R) * g.c + channel;  // tap (0, 0) of the first channel
    I remaining = cg - it.lane;
    unsigned rows, cols;
    window_bits<K>(g, cy, cx, &rows, &cols);
    if (rows == (1u << K) - 1u && cols == (1u << K) - 1u) {  // the whole window is inside the map
      for (; remaining > (J - 1) * L; remaining -= step, go += step, xs += step) {
        masks_nhwc_block<K, J, L, false, false>(acc, go, xs, row_step, col_step, rows, cols, remaining);
      }
    } else {
      for (; remaining > (J - 1) * L; remaining -= step, go += step, xs += step) {
        masks_nhwc_block<K, J, L, true, false>(acc, go, xs, row_step, col_step, rows, cols, remaining);
      }
    }
    if (remaining > 0) masks_nhwc_block<K, J, L, true, true>(acc, go, xs, row_step, col_step, rows, cols, remaining);
  } else {
    const I r = g.radius(), k = g.k, kk = g.taps(), first_tap = it.chunk * TAPS;
    I offsets[TAPS];  // of each tap's pixel in an image, or -1 when the tap lies outside the map (or past the last)
#pragma unroll
    for (int t = 0; t < TAPS; ++t) {
      const I tap = first_tap + t, ty = divide(tap, k), iy = cy + ty - r, ix = cx + (tap - ty * k) - r;
      const bool inside = tap < kk && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
      offsets[t] = inside ? (iy * g.w + ix) * g.c : I(-1);
    }
    const T* xs = x + it.n * g.h * g.w * g.c + channel;
    for (I remaining = cg - it.lane; remaining > 0; remaining -= step, go += step, xs += step) {
      Acc grad[J];
#pragma unroll
      for (int j = 0; j < J; ++j) grad[j] = j * L < remaining ? to_acc(load(go + j * L)) : Acc(0);
#pragma unroll
      for (int t = 0; t < TAPS; ++t) {
        if (offsets[t] < 0) continue;
        const T* tap = xs + offsets[t];
#pragma unroll
        for (int j = 0; j < J; ++j) {
          if (j * L < remaining) acc[t] += grad[j] * to_acc(load(tap + j * L));
        }
      }
    }
  }
}

// After the lanes' sums are added: this lane's share of the stores (taps t with t % L == lane), in the masks'
// layout.
template <int K, typename T, typename I>
CARAFE_HD void backward_masks_nhwc_store(const Geometry<I>& g, I item, const typename Accumulator<T>::type* acc,
                                         T* __restrict__ grad_m) {
  constexpr int L = nhwc_lanes<T>(), TAPS = nhwc_mask_taps<K>();
  const NhwcItem<I> it = nhwc_item<L>(g, item, K > 0 ? I(1) : g.tap_chunks(), g.out_h, g.out_w);
  const I first_tap = it.chunk * TAPS, kk = g.taps(), tap_stride = mask_tap_stride(g);
  T* dst = grad_m + mask_offset(g, it.n, it.grp, it.row, it.col) + first_tap * tap_stride;
#pragma unroll
  for (int t = 0; t < TAPS; ++t) {
    if (t % L == it.lane && first_tap + t < kk) from_acc(acc[t], dst + t * tap_stride);
  }
}

}  // namespace carafe
