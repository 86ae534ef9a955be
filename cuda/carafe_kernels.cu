// CUDA kernels of CARAFE / CARAFE++, compiled at run time through NVRTC by carafe/backends/cuda.py.
//
// Exported (extern "C", so CuPy finds them by name), for KS in k1, k3, k5, k7 (kernel size fixed at compile time)
// and kx (any odd kernel size, taps in a run-time loop), IB in i32, i64 (index width) and SUFFIX in f32, f64, f16,
// bf16:
//   carafe_forward_KS_IB_SUFFIX           (x, m, out, geometry...)
//   carafe_backward_features_KS_IB_SUFFIX (grad_out, m, grad_x, geometry...)
//   carafe_backward_masks_KS_IB_SUFFIX    (grad_out, x, grad_m, geometry...)
// on NCHW-contiguous tensors, and their channels_last twins carafe_forward_KS_IB_nhwc_SUFFIX, ... (same pointers,
// geometry..., masks_nhwc) on channels_last features / outputs / output gradients, with masks and their gradient
// channels_last when masks_nhwc is 1 and NCHW-contiguous when it is 0.
// geometry: n, c, h, w, out_h, out_w, k, groups, sigma, up, slices (all 64-bit integers; up is 1 for CARAFE, 0 for
// CARAFE++ downsampling; slices: channel slices per group of the forward pass, fixed k for NCHW and every k for
// NHWC, 1 elsewhere). The i32
// kernels may only be launched when every element offset and work item count fits in 31 bits (the loader checks).
// Launch one thread per work item (Geometry::*_items(), *_nhwc_items()), THREADS_PER_BLOCK threads per block; threads stride over
// the grid, so any grid size is correct. The math lives in carafe_reassemble.cuh.
//
// The loader compiles one module per dtype, kernel size, index width and layout by defining CARAFE_ONLY_<SUFFIX>,
// CARAFE_ONLY_K=<k or 0>, CARAFE_ONLY_INDEX=<32 or 64> and CARAFE_ONLY_NHWC=<0 or 1>; with none defined, every
// variant is exported. The
// fp16 / bf16 headers are included only by the modules that need them, so f32 / f64 build without any CUDA include
// folder.

#if !defined(CARAFE_ONLY_F32) && !defined(CARAFE_ONLY_F64) && !defined(CARAFE_ONLY_F16) && !defined(CARAFE_ONLY_BF16)
#define CARAFE_ALL_DTYPES
#endif
#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_F16)
#define CARAFE_WITH_F16
#include <cuda_fp16.h>
#endif
#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_BF16)
#define CARAFE_WITH_BF16
#include <cuda_bf16.h>
#endif

#include "carafe_reassemble.cuh"

// Threads per block of every kernel (THREADS_PER_BLOCK in carafe/backends/cuda.py).
#define CARAFE_THREADS 256

namespace carafe {

#if defined(CARAFE_WITH_F16)
template <>
struct Convert<__half> {
  __device__ __forceinline__ static float widen(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half narrow(float v) { return __float2half_rn(v); }
};
#endif
#if defined(CARAFE_WITH_BF16)
template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }
};
#endif

// Resident blocks per SM that __launch_bounds__ asks for, i.e. the register cap: per variant the most blocks of
// 256 threads that compile without spills on sm_80 and sm_90 (found by compiling every kernel at 4 and 3 blocks;
// scripts/bench_cuda_static.py reports the result). 4 blocks = 64 registers = 50 % occupancy, 3 = 80 registers =
// 37.5 %, 2 = 128 registers = 25 %, 1 = 255 registers = 12.5 %. What stays below 4: the k = 7 kernels that hold
// 49 weights or sums per thread, fp64 with k >= 5 (two registers a value), and most 64-bit index kernels (used only
// for tensors of 2^30 elements or more), whose addresses and loop bounds take two registers each.
enum Pass { kForward, kBackwardFeatures, kBackwardMasks };
template <int P, int K, typename I, typename T>
__host__ __device__ constexpr int min_blocks() {
  constexpr bool wide = sizeof(I) == 8, f64 = sizeof(T) == 8;
  if constexpr (!f64) {
    if constexpr (P == kForward) return K == 7 ? 2 : !wide ? 4 : (K == 1 || K == 3) ? 4 : 3;
    if constexpr (P == kBackwardFeatures) return !wide ? 4 : (K == 0 && sizeof(T) == 2) ? 2 : 3;
    return K == 7 ? 2 : !wide ? 4 : K == 1 ? 4 : K == 3 ? 3 : K == 5 ? (sizeof(T) == 4 ? 3 : 2) : 2;
  } else {
    if constexpr (P == kForward) return K == 7 ? 1 : K == 5 ? 2 : (K == 0 && wide) ? 3 : 4;
    if constexpr (P == kBackwardFeatures) return wide ? 2 : K == 1 ? 4 : 3;
    return K == 7 ? 1 : K == 5 ? 2 : K == 1 ? 4 : K == 3 ? (wide ? 3 : 4) : (wide ? 2 : 3);
  }
}

// The channels_last kernels' register caps, the same way.
template <int P, int K, typename I, typename T>
__host__ __device__ constexpr int min_blocks_nhwc() {
  constexpr bool wide = sizeof(I) == 8, f64 = sizeof(T) == 8;
  if constexpr (!f64) {
    if constexpr (P == kForward) return K == 7 ? 1 : !wide ? 4 : K == 5 ? 2 : 4;
    if constexpr (P == kBackwardFeatures) return !wide ? 4 : K == 1 ? 3 : 2;
    return K == 7 ? 1 : !wide ? 4 : K == 1 ? 4 : K == 3 ? 3 : K == 5 ? 1 : 2;
  } else {
    if constexpr (P == kForward) return K == 7 ? 1 : K == 5 ? 2 : 4;
    if constexpr (P == kBackwardFeatures) return wide ? 2 : K == 1 ? 4 : 3;
    return K >= 5 ? (K == 7 ? 1 : 2) : K == 1 ? 4 : (K == 3 && !wide) ? 3 : 2;
  }
}

// The L lanes that share an output pixel (consecutive lanes of a warp, L a power of two) add their partial sums:
// at each step lane l adds lane (l ^ offset)'s values to its own, so after log2(L) steps every lane holds the
// totals (tests/cuda_host_harness.cpp repeats the same additions in the same order).
template <int L, int N, typename Acc>
__device__ __forceinline__ void sum_over_lanes(Acc* acc) {
  static_assert(L >= 1 && L <= 32 && (L & (L - 1)) == 0, "lanes must be a power of two within a warp");
  if constexpr (L > 1) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned lanes = L == 32 ? 0xffffffffu : ((1u << L) - 1u) << (lane & ~(L - 1u));
#pragma unroll
    for (int offset = L / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int t = 0; t < N; ++t) acc[t] = acc[t] + __shfl_xor_sync(lanes, acc[t], offset, L);
    }
  }
}

template <typename I>
__device__ __forceinline__ I first_item() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}

template <typename I>
__device__ __forceinline__ I item_stride() {
  return static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
}

}  // namespace carafe

#define CARAFE_KERNEL(NAME, PASS, PASS_ID, K, I, T, A, B, OUT)                                                    \
  extern "C" __global__ void __launch_bounds__(CARAFE_THREADS, (carafe::min_blocks<carafe::PASS_ID, K, I, T>()))  \
      NAME(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ OUT, CARAFE_GEOMETRY_PARAMS) {      \
    const carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                             \
    const I total = g.PASS##_items(K);                                                                            \
    for (I item = carafe::first_item<I>(); item < total; item += carafe::item_stride<I>()) {                      \
      carafe::PASS##_item<K>(g, item, A, B, OUT);                                                                 \
    }                                                                                                             \
  }

// Channels_last: one thread per work item as above (Geometry items of the _nhwc_ passes); masks_nhwc says the masks'
// layout.
#define CARAFE_NHWC_KERNEL(NAME, PASS, PASS_ID, K, I, T, A, B, OUT)                                               \
  extern "C" __global__ void __launch_bounds__(CARAFE_THREADS,                                                    \
                                               (carafe::min_blocks_nhwc<carafe::PASS_ID, K, I, T>()))            \
      NAME(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ OUT, CARAFE_GEOMETRY_PARAMS,       \
           long long masks_nhwc) {                                                                                \
    carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                                   \
    g.masks_nhwc = masks_nhwc != 0;                                                                               \
    const I total = carafe::PASS##_nhwc_items<K, T>(g);                                                           \
    for (I item = carafe::first_item<I>(); item < total; item += carafe::item_stride<I>()) {                      \
      carafe::PASS##_nhwc_item<K>(g, item, A, B, OUT);                                                            \
    }                                                                                                             \
  }

// The channels_last mask gradient: each lane's partial sums, added over the pixel's lanes, then stored. The item
// count is a multiple of the lane count and the grid stride a multiple of the warp size, so the lanes of a pixel
// are always in the same loop iteration.
#define CARAFE_NHWC_MASKS_KERNEL(NAME, K, I, T)                                                                   \
  extern "C" __global__ void __launch_bounds__(CARAFE_THREADS,                                                    \
                                               (carafe::min_blocks_nhwc<carafe::kBackwardMasks, K, I, T>()))     \
      NAME(const T* __restrict__ grad_out, const T* __restrict__ x, T* __restrict__ grad_m,                       \
           CARAFE_GEOMETRY_PARAMS, long long masks_nhwc) {                                                        \
    carafe::Geometry<I> g = CARAFE_GEOMETRY(I);                                                                   \
    g.masks_nhwc = masks_nhwc != 0;                                                                               \
    const I total = carafe::backward_masks_nhwc_items<K, T>(g);                                                   \
    for (I item = carafe::first_item<I>(); item < total; item += carafe::item_stride<I>()) {                      \
      typename carafe::Accumulator<T>::type acc[carafe::nhwc_mask_taps<K>()];                                     \
      carafe::backward_masks_nhwc_partial<K>(g, item, grad_out, x, acc);                                          \
      carafe::sum_over_lanes<carafe::nhwc_lanes<T>(), carafe::nhwc_mask_taps<K>()>(acc);                          \
      carafe::backward_masks_nhwc_store<K>(g, item, acc, grad_m);                                                 \
    }                                                                                                             \
  }

#if !defined(CARAFE_ONLY_NHWC) || CARAFE_ONLY_NHWC == 0
#define CARAFE_EXPORT_NCHW(T, SUFFIX, K, KNAME, I, INAME)                                                         \
  CARAFE_KERNEL(carafe_forward_##KNAME##_##INAME##_##SUFFIX, forward, kForward, K, I, T, x, m, out)               \
  CARAFE_KERNEL(carafe_backward_features_##KNAME##_##INAME##_##SUFFIX, backward_features, kBackwardFeatures, K, I, \
                T, grad_out, m, grad_x)                                                                           \
  CARAFE_KERNEL(carafe_backward_masks_##KNAME##_##INAME##_##SUFFIX, backward_masks, kBackwardMasks, K, I, T,      \
                grad_out, x, grad_m)
#else
#define CARAFE_EXPORT_NCHW(T, SUFFIX, K, KNAME, I, INAME)
#endif
#if !defined(CARAFE_ONLY_NHWC) || CARAFE_ONLY_NHWC == 1
#define CARAFE_EXPORT_NHWC(T, SUFFIX, K, KNAME, I, INAME)                                                         \
  CARAFE_NHWC_KERNEL(carafe_forward_##KNAME##_##INAME##_nhwc_##SUFFIX, forward, kForward, K, I, T, x, m, out)     \
  CARAFE_NHWC_KERNEL(carafe_backward_features_##KNAME##_##INAME##_nhwc_##SUFFIX, backward_features,               \
                     kBackwardFeatures, K, I, T, grad_out, m, grad_x)                                             \
  CARAFE_NHWC_MASKS_KERNEL(carafe_backward_masks_##KNAME##_##INAME##_nhwc_##SUFFIX, K, I, T)
#else
#define CARAFE_EXPORT_NHWC(T, SUFFIX, K, KNAME, I, INAME)
#endif
#define CARAFE_EXPORT_KI(T, SUFFIX, K, KNAME, I, INAME) \
  CARAFE_EXPORT_NCHW(T, SUFFIX, K, KNAME, I, INAME) CARAFE_EXPORT_NHWC(T, SUFFIX, K, KNAME, I, INAME)

#if !defined(CARAFE_ONLY_INDEX) || CARAFE_ONLY_INDEX == 32
#define CARAFE_EXPORT_K_I32(T, SUFFIX, K, KNAME) CARAFE_EXPORT_KI(T, SUFFIX, K, KNAME, int, i32)
#else
#define CARAFE_EXPORT_K_I32(T, SUFFIX, K, KNAME)
#endif
#if !defined(CARAFE_ONLY_INDEX) || CARAFE_ONLY_INDEX == 64
#define CARAFE_EXPORT_K_I64(T, SUFFIX, K, KNAME) CARAFE_EXPORT_KI(T, SUFFIX, K, KNAME, long long, i64)
#else
#define CARAFE_EXPORT_K_I64(T, SUFFIX, K, KNAME)
#endif
#define CARAFE_EXPORT_K(T, SUFFIX, K, KNAME) \
  CARAFE_EXPORT_K_I32(T, SUFFIX, K, KNAME) CARAFE_EXPORT_K_I64(T, SUFFIX, K, KNAME)

#if !defined(CARAFE_ONLY_K) || CARAFE_ONLY_K == 1
#define CARAFE_EXPORT_K1(T, SUFFIX) CARAFE_EXPORT_K(T, SUFFIX, 1, k1)
#else
#define CARAFE_EXPORT_K1(T, SUFFIX)
#endif
#if !defined(CARAFE_ONLY_K) || CARAFE_ONLY_K == 3
#define CARAFE_EXPORT_K3(T, SUFFIX) CARAFE_EXPORT_K(T, SUFFIX, 3, k3)
#else
#define CARAFE_EXPORT_K3(T, SUFFIX)
#endif
#if !defined(CARAFE_ONLY_K) || CARAFE_ONLY_K == 5
#define CARAFE_EXPORT_K5(T, SUFFIX) CARAFE_EXPORT_K(T, SUFFIX, 5, k5)
#else
#define CARAFE_EXPORT_K5(T, SUFFIX)
#endif
#if !defined(CARAFE_ONLY_K) || CARAFE_ONLY_K == 7
#define CARAFE_EXPORT_K7(T, SUFFIX) CARAFE_EXPORT_K(T, SUFFIX, 7, k7)
#else
#define CARAFE_EXPORT_K7(T, SUFFIX)
#endif
#if !defined(CARAFE_ONLY_K) || CARAFE_ONLY_K == 0
#define CARAFE_EXPORT_KX(T, SUFFIX) CARAFE_EXPORT_K(T, SUFFIX, 0, kx)
#else
#define CARAFE_EXPORT_KX(T, SUFFIX)
#endif

#define CARAFE_EXPORT(T, SUFFIX)                                                                                  \
  CARAFE_EXPORT_K1(T, SUFFIX) CARAFE_EXPORT_K3(T, SUFFIX) CARAFE_EXPORT_K5(T, SUFFIX) CARAFE_EXPORT_K7(T, SUFFIX) \
  CARAFE_EXPORT_KX(T, SUFFIX)

#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_F32)
CARAFE_EXPORT(float, f32)
#endif
#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_F64)
CARAFE_EXPORT(double, f64)
#endif
#if defined(CARAFE_WITH_F16)
CARAFE_EXPORT(__half, f16)
#endif
#if defined(CARAFE_WITH_BF16)
CARAFE_EXPORT(__nv_bfloat16, bf16)
#endif
