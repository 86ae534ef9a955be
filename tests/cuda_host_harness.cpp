// Runs the per-thread functions of cuda/carafe_reassemble.cuh on the host, one work item after another, so the
// kernels' index math is tested against the reference on machines without a GPU (tests/test_cuda_kernels_host.py).
// Built with: g++ -std=c++17 -O1 -shared -fPIC -I cuda tests/cuda_host_harness.cpp
//
// Built with -DCARAFE_TRACE instead, every load() / store() of the kernels records its address and touches no
// memory; host_traffic_* then counts the distinct 32-byte sectors each sampled thread block reads and writes (the
// memory-traffic model of scripts/bench_cuda_static.py: perfect reuse inside a block, none between blocks).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "carafe_reassemble.cuh"

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

#define HOST_TRAFFIC(T, SUFFIX, KERNEL, ITEMS)                                                                      \
  extern "C" void host_traffic_##KERNEL##_##SUFFIX(const T* a, const T* b, T* out, CARAFE_GEOMETRY_PARAMS,         \
                                                   long long threads, long long samples, long long* result) {      \
    const carafe::Geometry g = CARAFE_GEOMETRY;                                                                     \
    traffic(g.ITEMS(), threads, samples, result, [&](long long i) { carafe::KERNEL##_item(g, i, a, b, out); });    \
  }
#define HOST_EXPORT(T, SUFFIX)                                              \
  HOST_TRAFFIC(T, SUFFIX, forward, forward_items)                           \
  HOST_TRAFFIC(T, SUFFIX, backward_features, backward_features_items)       \
  HOST_TRAFFIC(T, SUFFIX, backward_masks, backward_masks_items)

#else
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
#endif

HOST_EXPORT(float, f32)
HOST_EXPORT(double, f64)
