// Runs the per-thread functions of cuda/carafe_reassemble.cuh on the host, one work item after another, so the
// kernels' index math is tested against the reference on machines without a GPU (tests/test_cuda_kernels_host.py).
// Built with: g++ -std=c++17 -O1 -shared -fPIC -I cuda tests/cuda_host_harness.cpp

#include "carafe_reassemble.cuh"

namespace {

carafe::Geometry make_geometry(long long n, long long c, long long h, long long w, long long out_h, long long out_w,
                               long long k, long long groups, long long sigma, long long up) {
  carafe::Geometry g;
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

}  // namespace

#define HOST_GEOMETRY_PARAMS                                                                                      \
  long long n, long long c, long long h, long long w, long long out_h, long long out_w, long long k,              \
      long long groups, long long sigma, long long up
#define HOST_GEOMETRY make_geometry(n, c, h, w, out_h, out_w, k, groups, sigma, up)

#define HOST_EXPORT(T, SUFFIX)                                                                                    \
  extern "C" void host_forward_##SUFFIX(const T* a, const T* b, T* out, HOST_GEOMETRY_PARAMS) {                   \
    const carafe::Geometry g = HOST_GEOMETRY;                                                                     \
    for (long long i = 0; i < g.forward_items(); ++i) carafe::forward_item(g, i, a, b, out);                      \
  }                                                                                                               \
  extern "C" void host_backward_features_##SUFFIX(const T* a, const T* b, T* out, HOST_GEOMETRY_PARAMS) {         \
    const carafe::Geometry g = HOST_GEOMETRY;                                                                     \
    for (long long i = 0; i < g.backward_features_items(); ++i) carafe::backward_features_item(g, i, a, b, out);  \
  }                                                                                                               \
  extern "C" void host_backward_masks_##SUFFIX(const T* a, const T* b, T* out, HOST_GEOMETRY_PARAMS) {            \
    const carafe::Geometry g = HOST_GEOMETRY;                                                                     \
    for (long long i = 0; i < g.backward_masks_items(); ++i) carafe::backward_masks_item(g, i, a, b, out);        \
  }

HOST_EXPORT(float, f32)
HOST_EXPORT(double, f64)
