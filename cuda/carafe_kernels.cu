// CUDA kernels of CARAFE / CARAFE++, compiled at run time through NVRTC by carafe/backends/cuda.py.
//
// Exported (extern "C", so CuPy finds them by name), for SUFFIX in f32, f64, f16, bf16:
//   carafe_forward_SUFFIX           (x, m, out, geometry...)
//   carafe_backward_features_SUFFIX (grad_out, m, grad_x, geometry...)
//   carafe_backward_masks_SUFFIX    (grad_out, x, grad_m, geometry...)
// geometry: n, c, h, w, out_h, out_w, k, groups, sigma, up (all 64-bit integers; up is 1 for CARAFE, 0 for
// CARAFE++ downsampling). Launch one thread per work item (Geometry::*_items()); threads stride over the grid, so
// any grid size is correct. The math lives in carafe_reassemble.cuh.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "carafe_reassemble.cuh"

namespace carafe {

__device__ __forceinline__ index_t first_item() {
  return static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ index_t item_stride() { return static_cast<index_t>(gridDim.x) * blockDim.x; }

template <typename T>
__device__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ m, T* __restrict__ out,
                               const Geometry g) {
  const index_t total = g.forward_items();
  for (index_t item = first_item(); item < total; item += item_stride()) forward_item(g, item, x, m, out);
}

template <typename T>
__device__ void backward_features_kernel(const T* __restrict__ grad_out, const T* __restrict__ m,
                                         T* __restrict__ grad_x, const Geometry g) {
  const index_t total = g.backward_features_items();
  for (index_t item = first_item(); item < total; item += item_stride()) {
    backward_features_item(g, item, grad_out, m, grad_x);
  }
}

template <typename T>
__device__ void backward_masks_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                      T* __restrict__ grad_m, const Geometry g) {
  const index_t total = g.backward_masks_items();
  for (index_t item = first_item(); item < total; item += item_stride()) {
    backward_masks_item(g, item, grad_out, x, grad_m);
  }
}

}  // namespace carafe

#define CARAFE_EXPORT(T, SUFFIX)                                                                                  \
  extern "C" __global__ void carafe_forward_##SUFFIX(const T* __restrict__ x, const T* __restrict__ m,            \
                                                     T* __restrict__ out, CARAFE_GEOMETRY_PARAMS) {               \
    carafe::forward_kernel<T>(x, m, out, CARAFE_GEOMETRY);                                                        \
  }                                                                                                               \
  extern "C" __global__ void carafe_backward_features_##SUFFIX(                                                   \
      const T* __restrict__ grad_out, const T* __restrict__ m, T* __restrict__ grad_x, CARAFE_GEOMETRY_PARAMS) {  \
    carafe::backward_features_kernel<T>(grad_out, m, grad_x, CARAFE_GEOMETRY);                                    \
  }                                                                                                               \
  extern "C" __global__ void carafe_backward_masks_##SUFFIX(                                                      \
      const T* __restrict__ grad_out, const T* __restrict__ x, T* __restrict__ grad_m, CARAFE_GEOMETRY_PARAMS) {  \
    carafe::backward_masks_kernel<T>(grad_out, x, grad_m, CARAFE_GEOMETRY);                                       \
  }

// The loader compiles one dtype per module by defining CARAFE_ONLY_<SUFFIX>; with none defined, all are exported.
#if !defined(CARAFE_ONLY_F32) && !defined(CARAFE_ONLY_F64) && !defined(CARAFE_ONLY_F16) && !defined(CARAFE_ONLY_BF16)
#define CARAFE_ALL_DTYPES
#endif
#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_F32)
CARAFE_EXPORT(float, f32)
#endif
#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_F64)
CARAFE_EXPORT(double, f64)
#endif
#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_F16)
CARAFE_EXPORT(__half, f16)
#endif
#if defined(CARAFE_ALL_DTYPES) || defined(CARAFE_ONLY_BF16)
CARAFE_EXPORT(__nv_bfloat16, bf16)
#endif
