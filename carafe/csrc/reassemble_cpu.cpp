// CARAFE / CARAFE++ reassembly on the CPU: forward, gradient w.r.t. features and gradient w.r.t. masks.
//
// Shapes, in logical (N, H, W, C) order:
//   x    [N, H,  W,  C]        input features
//   m    [N, Ho, Wo, G*k*k]    reassembly kernels, tap (ky, kx) of group g at g*k*k + ky*k + kx
//   out  [N, Ho, Wo, C]
// Output (p, q) reassembles the k x k window of x centred at (cy, cx): up (sigma-fold upsampling) cy = p / sigma,
// down (CARAFE++) cy = p * sigma. Taps outside x contribute zero. Channel c belongs to group c / (C / G).
//
// Each tensor is stored either channels-last (NHWC) or channels-first (NCHW), given by a flag. The arithmetic always
// runs on channels-last rows, so its innermost loop is over channels with unit stride and vectorises; a
// channels-first tensor is transposed one image row at a time into a small per-thread cache (RowReader) or out of a
// row buffer (RowWriter). That avoids transposing whole tensors into fresh buffers, which costs more than the
// arithmetic (the op is memory-bound and page faults on new allocations are slow).
//
// The feature gradient is a gather (each input pixel sums over the outputs that read it) rather than a scatter, so
// threads never write the same memory and the result does not depend on the thread count.
// Exported through a C ABI and called with ctypes; no Python or libtorch headers are needed to build it.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

struct Geometry {
  int64_t n, c, h, w, out_h, out_w, k, groups, sigma;
  bool up;
  int64_t radius() const { return k / 2; }
  int64_t taps() const { return k * k; }
  int64_t group_channels() const { return c / groups; }
  int64_t mask_channels() const { return groups * k * k; }
  int64_t centre(int64_t out_index) const { return up ? out_index / sigma : out_index * sigma; }
  // Output indices [lo, hi) along an axis of length out_len whose reassembly centre is input index `centre`.
  void outputs_centred_at(int64_t centre, int64_t out_len, int64_t& lo, int64_t& hi) const {
    if (up) {
      lo = centre * sigma;
      hi = std::min(lo + sigma, out_len);
    } else if (centre % sigma == 0 && centre / sigma < out_len) {
      lo = centre / sigma;
      hi = lo + 1;
    } else {
      lo = hi = 0;
    }
  }
  // Most output rows any one input row contributes to (through all its taps): the feature gradient's window.
  int64_t output_rows_per_input_row() const { return up ? k * sigma : k; }
};

// Runs fn(begin, end) over [0, total) split into contiguous chunks on up to `threads` threads.
template <typename Fn>
void parallel_for(int64_t total, int threads, Fn fn) {
  const int64_t chunks = std::min<int64_t>(std::max(threads, 1), total);
  if (chunks <= 1) {
    fn(int64_t{0}, total);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(chunks - 1);
  for (int64_t i = 1; i < chunks; ++i) pool.emplace_back(fn, total * i / chunks, total * (i + 1) / chunks);
  fn(int64_t{0}, total / chunks);
  for (auto& t : pool) t.join();
}

// dst[x * c + ch] = src[ch * plane + x] for one image row of width w: channels-first -> channels-last.
template <typename T>
void row_to_channels_last(const T* __restrict__ src, int64_t plane, int64_t w, int64_t c, T* __restrict__ dst) {
  constexpr int64_t kTile = 16;
  for (int64_t c0 = 0; c0 < c; c0 += kTile) {
    const int64_t c1 = std::min(c0 + kTile, c);
    for (int64_t x = 0; x < w; ++x) {
      for (int64_t ch = c0; ch < c1; ++ch) dst[x * c + ch] = src[ch * plane + x];
    }
  }
}

template <typename T>
void row_to_channels_first(const T* __restrict__ src, int64_t plane, int64_t w, int64_t c, T* __restrict__ dst) {
  constexpr int64_t kTile = 16;
  for (int64_t x0 = 0; x0 < w; x0 += kTile) {
    const int64_t x1 = std::min(x0 + kTile, w);
    for (int64_t ch = 0; ch < c; ++ch) {
      for (int64_t x = x0; x < x1; ++x) dst[ch * plane + x] = src[x * c + ch];
    }
  }
}

// Read access to rows of an (N, H, W, C) tensor as channels-last [W][C] arrays. A channels-first tensor's rows are
// transposed into a direct-mapped cache of `slots` rows; callers access rows in increasing order within a thread,
// and any `slots` consecutive rows can be held at once.
template <typename T>
class RowReader {
 public:
  RowReader(const T* data, int64_t h, int64_t w, int64_t c, bool channels_first, int64_t slots)
      : data_(data), h_(h), w_(w), c_(c), channels_first_(channels_first), slots_(slots) {
    if (channels_first_) {
      cache_.resize(slots * w * c);
      tags_.assign(slots, -1);
    }
  }

  const T* row(int64_t n, int64_t y) {
    const int64_t index = n * h_ + y;
    if (!channels_first_) return data_ + index * w_ * c_;
    const int64_t slot = index % slots_;
    T* cached = cache_.data() + slot * w_ * c_;
    if (tags_[slot] != index) {
      row_to_channels_last(data_ + n * c_ * h_ * w_ + y * w_, h_ * w_, w_, c_, cached);
      tags_[slot] = index;
    }
    return cached;
  }

 private:
  const T* data_;
  int64_t h_, w_, c_;
  bool channels_first_;
  int64_t slots_;
  std::vector<T> cache_;
  std::vector<int64_t> tags_;
};

// Write access to rows of an (N, H, W, C) tensor: row() gives a channels-last [W][C] array to fill, commit() stores
// it (a no-op when the tensor itself is channels-last, since row() then points into it).
template <typename T>
class RowWriter {
 public:
  RowWriter(T* data, int64_t h, int64_t w, int64_t c, bool channels_first)
      : data_(data), h_(h), w_(w), c_(c), channels_first_(channels_first) {
    if (channels_first_) buffer_.resize(w * c);
  }

  T* row(int64_t n, int64_t y) { return channels_first_ ? buffer_.data() : data_ + (n * h_ + y) * w_ * c_; }

  void commit(int64_t n, int64_t y) {
    if (channels_first_) row_to_channels_first(buffer_.data(), h_ * w_, w_, c_, data_ + n * c_ * h_ * w_ + y * w_);
  }

 private:
  T* data_;
  int64_t h_, w_, c_;
  bool channels_first_;
  std::vector<T> buffer_;
};

// Channels are processed in blocks of this many elements (256 bytes) so the accumulators stay in registers.
template <typename T>
constexpr int64_t kBlock = 256 / sizeof(T);

template <typename T, int64_t B>
inline void axpy_fixed(T* __restrict__ acc, T a, const T* __restrict__ x) {
#pragma omp simd
  for (int64_t i = 0; i < B; ++i) acc[i] += a * x[i];
}

template <typename T>
inline void axpy(T* __restrict__ acc, T a, const T* __restrict__ x, int64_t len) {
  if (len == kBlock<T>) {
    axpy_fixed<T, kBlock<T>>(acc, a, x);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) acc[i] += a * x[i];
}

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t len) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += a[i] * b[i];
  return s;
}

struct Layouts {
  bool a_channels_first, b_channels_first, out_channels_first;
};

template <typename T>
void forward(const Geometry& g, const T* x, const T* m, T* out, Layouts layout, int threads) {
  const int64_t r = g.radius(), k = g.k, cg = g.group_channels(), mc = g.mask_channels();
  parallel_for(g.n * g.out_h, threads, [&](int64_t begin, int64_t end) {
    RowReader<T> xs(x, g.h, g.w, g.c, layout.a_channels_first, k);
    RowReader<T> ms(m, g.out_h, g.out_w, mc, layout.b_channels_first, 1);
    RowWriter<T> outs(out, g.out_h, g.out_w, g.c, layout.out_channels_first);
    std::vector<const T*> x_rows(k);
    alignas(64) T acc[kBlock<T>];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, p = row % g.out_h, cy = g.centre(p);
      const int64_t ky0 = std::max<int64_t>(0, r - cy), ky1 = std::min<int64_t>(k, g.h - cy + r);
      for (int64_t ky = ky0; ky < ky1; ++ky) x_rows[ky] = xs.row(n, cy + ky - r);
      const T* mask_row = ms.row(n, p);
      T* out_row = outs.row(n, p);
      for (int64_t q = 0; q < g.out_w; ++q) {
        const int64_t cx = g.centre(q);
        const int64_t kx0 = std::max<int64_t>(0, r - cx), kx1 = std::min<int64_t>(k, g.w - cx + r);
        const T* mask = mask_row + q * mc;
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t cb = 0; cb < cg; cb += kBlock<T>) {
            const int64_t len = std::min(kBlock<T>, cg - cb), offset = grp * cg + cb;
            std::fill(acc, acc + len, T(0));
            for (int64_t ky = ky0; ky < ky1; ++ky) {
              for (int64_t kx = kx0; kx < kx1; ++kx) {
                axpy(acc, mask[grp * g.taps() + ky * k + kx], x_rows[ky] + (cx + kx - r) * g.c + offset, len);
              }
            }
            std::copy(acc, acc + len, out_row + q * g.c + offset);
          }
        }
      }
      outs.commit(n, p);
    }
  });
}

template <typename T>
void backward_features(const Geometry& g, const T* grad_out, const T* m, T* grad_x, Layouts layout, int threads) {
  const int64_t r = g.radius(), k = g.k, cg = g.group_channels(), mc = g.mask_channels();
  const int64_t window = g.output_rows_per_input_row();
  parallel_for(g.n * g.h, threads, [&](int64_t begin, int64_t end) {
    RowReader<T> gos(grad_out, g.out_h, g.out_w, g.c, layout.a_channels_first, window);
    RowReader<T> ms(m, g.out_h, g.out_w, mc, layout.b_channels_first, window);
    RowWriter<T> gxs(grad_x, g.h, g.w, g.c, layout.out_channels_first);
    // For each tap row ky: the output rows [p_lo, p_hi) that read input row iy through it, and their data.
    std::vector<int64_t> p_lo(k), p_hi(k);
    std::vector<const T*> go_rows(k * g.sigma), mask_rows(k * g.sigma);
    alignas(64) T acc[kBlock<T>];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.h, iy = row % g.h;
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t cy = iy - ky + r;
        p_lo[ky] = p_hi[ky] = 0;
        if (cy >= 0 && cy < g.h) g.outputs_centred_at(cy, g.out_h, p_lo[ky], p_hi[ky]);
        for (int64_t p = p_lo[ky]; p < p_hi[ky]; ++p) {
          go_rows[ky * g.sigma + p - p_lo[ky]] = gos.row(n, p);
          mask_rows[ky * g.sigma + p - p_lo[ky]] = ms.row(n, p);
        }
      }
      T* gx_row = gxs.row(n, iy);
      for (int64_t ix = 0; ix < g.w; ++ix) {
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t cb = 0; cb < cg; cb += kBlock<T>) {
            const int64_t len = std::min(kBlock<T>, cg - cb), offset = grp * cg + cb;
            std::fill(acc, acc + len, T(0));
            // Input (iy, ix) is tap (ky, kx) of every output whose centre is (iy - ky + r, ix - kx + r).
            for (int64_t ky = 0; ky < k; ++ky) {
              for (int64_t kx = 0; kx < k; ++kx) {
                const int64_t cx = ix - kx + r;
                if (cx < 0 || cx >= g.w) continue;
                int64_t q0, q1;
                g.outputs_centred_at(cx, g.out_w, q0, q1);
                const int64_t tap = grp * g.taps() + ky * k + kx;
                for (int64_t j = 0; j < p_hi[ky] - p_lo[ky]; ++j) {
                  const T* go_row = go_rows[ky * g.sigma + j];
                  const T* mask_row = mask_rows[ky * g.sigma + j];
                  for (int64_t q = q0; q < q1; ++q) axpy(acc, mask_row[q * mc + tap], go_row + q * g.c + offset, len);
                }
              }
            }
            std::copy(acc, acc + len, gx_row + ix * g.c + offset);
          }
        }
      }
      gxs.commit(n, iy);
    }
  });
}

template <typename T>
void backward_masks(const Geometry& g, const T* grad_out, const T* x, T* grad_m, Layouts layout, int threads) {
  const int64_t r = g.radius(), k = g.k, cg = g.group_channels(), mc = g.mask_channels();
  parallel_for(g.n * g.out_h, threads, [&](int64_t begin, int64_t end) {
    RowReader<T> gos(grad_out, g.out_h, g.out_w, g.c, layout.a_channels_first, 1);
    RowReader<T> xs(x, g.h, g.w, g.c, layout.b_channels_first, k);
    RowWriter<T> gms(grad_m, g.out_h, g.out_w, mc, layout.out_channels_first);
    std::vector<const T*> x_rows(k);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, p = row % g.out_h, cy = g.centre(p);
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t iy = cy + ky - r;
        x_rows[ky] = (iy >= 0 && iy < g.h) ? xs.row(n, iy) : nullptr;
      }
      const T* go_row = gos.row(n, p);
      T* gm_row = gms.row(n, p);
      for (int64_t q = 0; q < g.out_w; ++q) {
        const int64_t cx = g.centre(q);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const T* go = go_row + q * g.c + grp * cg;
          for (int64_t ky = 0; ky < k; ++ky) {
            for (int64_t kx = 0; kx < k; ++kx) {
              const int64_t ix = cx + kx - r;
              const bool inside = x_rows[ky] != nullptr && ix >= 0 && ix < g.w;
              gm_row[q * mc + grp * g.taps() + ky * k + kx] =
                  inside ? dot(go, x_rows[ky] + ix * g.c + grp * cg, cg) : T(0);
            }
          }
        }
      }
      gms.commit(n, p);
    }
  });
}

}  // namespace

// Arguments of every exported function after its three tensors: the geometry, each tensor's layout (1 for
// channels-first NCHW, 0 for channels-last NHWC, in the order of the tensor arguments), and the thread count.
#define CARAFE_ARGS                                                                                               \
  int64_t n, int64_t c, int64_t h, int64_t w, int64_t out_h, int64_t out_w, int64_t k, int64_t groups,            \
      int64_t sigma, int up, int a_cf, int b_cf, int out_cf, int threads
#define CARAFE_CALL(fn, a, b, out)                                                                                \
  fn(Geometry{n, c, h, w, out_h, out_w, k, groups, sigma, up != 0}, a, b, out,                                    \
     Layouts{a_cf != 0, b_cf != 0, out_cf != 0}, threads)

#define CARAFE_EXPORT(T, SUFFIX)                                                                                  \
  extern "C" void carafe_forward_##SUFFIX(const T* x, const T* m, T* out, CARAFE_ARGS) {                          \
    CARAFE_CALL(forward<T>, x, m, out);                                                                           \
  }                                                                                                               \
  extern "C" void carafe_backward_features_##SUFFIX(const T* grad_out, const T* m, T* grad_x, CARAFE_ARGS) {      \
    CARAFE_CALL(backward_features<T>, grad_out, m, grad_x);                                                       \
  }                                                                                                               \
  extern "C" void carafe_backward_masks_##SUFFIX(const T* grad_out, const T* x, T* grad_m, CARAFE_ARGS) {         \
    CARAFE_CALL(backward_masks<T>, grad_out, x, grad_m);                                                          \
  }

CARAFE_EXPORT(float, f32)
CARAFE_EXPORT(double, f64)
