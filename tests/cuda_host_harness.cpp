// Runs the per-thread functions of cuda/carafe_reassemble.cuh on the host, one work item after another, so the
// kernels' index math is tested against the reference on machines without a GPU (tests/test_cuda_kernels_host.py).
// Built with: g++ -std=c++17 -O1 -shared -fPIC -I cuda tests/cuda_host_harness.cpp

#include "carafe_reassemble.cuh"

#define HOST_EXPORT(T, SUFFIX)                                                                                        \
  extern "C" void host_forward_##SUFFIX(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS) {                     \
    const carafe::Geometry g = CARAFE_GEOMETRY;                                                                       \
    for (long long i = 0; i < g.forward_items(); ++i) carafe::forward_item(g, i, a, b, out);                          \
  }                                                                                                                   \
  extern "C" void host_backward_features_##SUFFIX(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS) {           \
    const carafe::Geometry g = CARAFE_GEOMETRY;                                                                       \
    for (long long i = 0; i < g.backward_features_items(); ++i) carafe::backward_features_item(g, i, a, b, out);      \
  }                                                                                                                   \
  extern "C" void host_backward_masks_##SUFFIX(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS) {              \
    const carafe::Geometry g = CARAFE_GEOMETRY;                                                                       \
    for (long long i = 0; i < g.backward_masks_items(); ++i) carafe::backward_masks_item(g, i, a, b, out);            \
  }

HOST_EXPORT(float, f32)
HOST_EXPORT(double, f64)
