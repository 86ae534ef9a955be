// CUDA kernels of CARAFE / CARAFE++, compiled at run time through NVRTC by carafe/backends/cuda.py.
//
// Exported (extern "C", so CuPy finds them by name), for KS in k1, k3, k5, k7 (kernel size fixed at compile time)
// and kx (any odd kernel size, taps in a run-time loop), IB in i32, i64 (index width) and SUFFIX in f32, f64, f16,
// bf16:
//   carafe_forward_KS_IB_SUFFIX           (x, m, out, geometry...)
//   carafe_backward_features_KS_IB_SUFFIX (grad_out, m, grad_x, geometry...)
//   carafe_backward_masks_KS_IB_SUFFIX    (grad_out, x, grad_m, geometry...)
// geometry: n, c, h, w, out_h, out_w, k, groups, sigma, up, slices (all 64-bit integers; up is 1 for CARAFE, 0 for
// CARAFE++ downsampling; slices: channel slices per group of the fixed-k forward pass, 1 elsewhere). The i32
// kernels may only be launched when every element offset and work item count fits in 31 bits (the loader checks).
// Launch one thread per work item (Geometry::*_items()), THREADS_PER_BLOCK threads per block; threads stride over
// the grid, so any grid size is correct. The math lives in carafe_reassemble.cuh.
//
// The loader compiles one module per dtype, kernel size and index width by defining CARAFE_ONLY_<SUFFIX>,
// CARAFE_ONLY_K=<k or 0> and CARAFE_ONLY_INDEX=<32 or 64>; with none defined, every variant is exported. The
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

// Resident blocks per SM that __launch_bounds__ asks for, i.e. the register cap, chosen per variant as the most
// that compiles without spills on sm_80 and sm_90 (scripts/bench_cuda_static.py reports the result):
//   4 blocks of 256 threads (50 % occupancy, 64 registers): 32-bit indices with 4- and 2-byte types, k <= 5 or
//     run-time k, and every such feature gradient;
//   3 blocks (80 registers): the 64-bit index forward pass (only used for tensors of 2^30 elements or more) and
//     double with k <= 3 or run-time k;
//   2 blocks (128 registers): k = 7 (49 weights or sums per thread), double with k >= 5 or 64-bit indices, and the
//     64-bit index gradients;
//   1 block (255 registers): the double forward pass and mask gradient with k = 7 (49 two-register values).
enum Pass { kForward, kBackwardFeatures, kBackwardMasks };
template <int P, int K, typename I, typename T>
__host__ __device__ constexpr int min_blocks() {
  return P == kBackwardFeatures ? (sizeof(I) == 8                     ? 2
                                   : sizeof(T) == 8                   ? (K >= 5 ? 2 : 3)
                                                                      : 4)
         : K == 7                                                     ? (sizeof(T) == 8 ? 1 : 2)
         : sizeof(T) == 8 && (sizeof(I) == 8 || K >= 5)               ? 2
         : sizeof(I) == 8 && P == kBackwardMasks                      ? 2
         : sizeof(I) == 8 || sizeof(T) == 8                           ? 3
                                                                      : 4;
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

#define CARAFE_EXPORT_KI(T, SUFFIX, K, KNAME, I, INAME)                                                           \
  CARAFE_KERNEL(carafe_forward_##KNAME##_##INAME##_##SUFFIX, forward, kForward, K, I, T, x, m, out)               \
  CARAFE_KERNEL(carafe_backward_features_##KNAME##_##INAME##_##SUFFIX, backward_features, kBackwardFeatures, K, I, \
                T, grad_out, m, grad_x)                                                                           \
  CARAFE_KERNEL(carafe_backward_masks_##KNAME##_##INAME##_##SUFFIX, backward_masks, kBackwardMasks, K, I, T,      \
                grad_out, x, grad_m)

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
