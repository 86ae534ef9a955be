// CARAFE / CARAFE++ reassembly on the CPU: forward, gradient w.r.t. features and gradient w.r.t. masks.
//
// Shapes, in logical (N, H, W, C) order:
//   x    [N, H,  W,  C]        input features
//   m    [N, Ho, Wo, G*k*k]    reassembly kernels, tap (ky, kx) of group g at g*k*k + ky*k + kx
//   out  [N, Ho, Wo, C]
// Output (p, q) reassembles the k x k window of x centred at (cy, cx): up (sigma-fold upsampling) cy = p / sigma,
// down (CARAFE++) cy = p * sigma. Taps outside x contribute zero. Channel c belongs to group c / (C / G).
//
// Each tensor is stored either channels-last (NHWC) or channels-first (NCHW), given by a flag. When all three
// tensors of a call are channels-first (the default layout), the kernels below "Channels-first" run on image rows
// directly, vectorised over columns. Otherwise the arithmetic runs on channels-last rows, vectorised over channels;
// a channels-first tensor among them is transposed one image row at a time into a small per-thread cache
// (RowReader) or out of a row buffer (RowWriter), never as a whole tensor into a fresh buffer (page faults on new
// allocations cost more than the arithmetic here).
//
// The feature gradient is a gather (each input pixel sums over the outputs that read it) rather than a scatter, so
// threads never write the same memory and the result does not depend on the thread count.
// Exported through a C ABI and called with ctypes; no Python or libtorch headers are needed to build it.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// ---- Channels-first (NCHW) kernels: vectorised over image columns, register-blocked over channels and outputs.
//
// When features, masks and output are all NCHW, the kernels run on image rows directly instead of transposing
// them. In the forward, output column q of an up-sampled row is phase q % sigma of centre column j = q / sigma; all
// sigma x sigma outputs of one centre read the same k x k features, so a register tile holds, for L consecutive
// centre columns, the sigma rows x sigma phases x CB channels of accumulators, and each loaded feature vector serves
// sigma^2 kernel weights while each loaded weight vector serves CB channels. Down-sampling (one output per centre,
// centres sigma apart) reads features through sigma de-interleaved copies of each row, so its loads are contiguous
// too. Weights are copied per centre row into a buffer with the phases de-interleaved and the weights of taps
// outside the map set to zero (they must contribute zero even when they are NaN); feature rows are copied with zero
// padding, so no load leaves its row. The two gradients reuse these buffers (see each).

// The widest vectors the target has (AVX-512, AVX2, else 16 bytes: SSE2, NEON) and how many registers hold them.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#else
constexpr int kVectorBytes = 16;
constexpr int kVectorRegisters = 16;
#endif

template <typename T>
struct VectorOf;
template <>
struct VectorOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using Vector = typename VectorOf<T>::type;
template <typename T>
constexpr int64_t kLanes = kVectorBytes / sizeof(T);

template <typename T>
inline Vector<T> load(const T* p) {
  Vector<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, Vector<T> v) {
  std::memcpy(p, &v, sizeof v);
}

// v, kept in a register: without this GCC folds the load into each of the FMAs that use it, loading the same
// vector once per FMA, and the loop becomes bound by loads instead of FMAs.
template <typename V>
inline V in_register(V v) {
#if defined(__GNUC__) && defined(__AVX__)
  __asm__("" : "+v"(v));
#elif defined(__GNUC__) && defined(__SSE2__)
  __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#endif
  return v;
}

// Lanes (a0, b0, a1, b1, ...) of two vectors: the first half in `low`, the second in `high`.
template <typename V, std::size_t... I>
inline void interleave(V a, V b, V& low, V& high, std::index_sequence<I...>) {
  constexpr std::size_t n = sizeof...(I);
#if defined(__clang__) || __GNUC__ >= 12
  low = __builtin_shufflevector(a, b, ((I % 2) ? n + I / 2 : I / 2)...);
  high = __builtin_shufflevector(a, b, ((I % 2) ? n + (n + I) / 2 : (n + I) / 2)...);
#else  // GCC before 12 has only __builtin_shuffle, with the lane indices in an integer vector
  using Index = std::conditional_t<sizeof(a[0]) == 4, int32_t, int64_t>;
  typedef Index Indices __attribute__((vector_size(sizeof(V))));
  low = __builtin_shuffle(a, b, Indices{static_cast<Index>((I % 2) ? n + I / 2 : I / 2)...});
  high = __builtin_shuffle(a, b, Indices{static_cast<Index>((I % 2) ? n + (n + I) / 2 : (n + I) / 2)...});
#endif
}

// Accumulators that fit in registers next to the weight and feature vectors a tap loads.
constexpr int channel_block(int outputs_per_centre) {
  const int free_registers = kVectorRegisters - outputs_per_centre - 2;
  return std::max(1, std::min(16, free_registers / outputs_per_centre));
}

// One thread's view of the channels-first forward: the scratch rows and the per-tap addressing.
template <typename T>
struct ChannelsFirstPlan {
  int64_t rows_per_centre, phases;  // output rows and columns per centre (sigma each when up, 1 when down)
  int64_t centres, vectors, padded;  // centre columns per row, vectors of them, vectors * lanes
  int64_t feature_phases, feature_stride, pad, row_len;  // de-interleaved copies of a feature row
  std::vector<int64_t> tap_offset;  // for tap column kx: where lane 0 of vector 0 reads in a prepared row
};

inline int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }
// ceil(a / b) for a >= 0, b >= 1, without forming a + b - 1 (which overflows for a scale factor near 2^63).
inline int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }

template <typename T>
ChannelsFirstPlan<T> plan_channels_first(const Geometry& g) {
  ChannelsFirstPlan<T> plan;
  const int64_t r = g.radius(), L = kLanes<T>;
  plan.rows_per_centre = plan.phases = g.up ? g.sigma : 1;
  plan.centres = g.up ? g.w : g.out_w;
  plan.vectors = (plan.centres + L - 1) / L;
  plan.padded = plan.vectors * L;
  plan.feature_stride = g.up ? 1 : g.sigma;
  // Copy `phase` holds columns phase, phase + stride, ...; a copy with phase >= w holds no column of x (only zeros),
  // so of those only one (phase w) is kept and every tap reading a later phase reads it instead. The copies are
  // thus bounded by the map's width, not by sigma (down-sampling a 3-wide map by 2^24 keeps 4 copies, not 2^24).
  plan.feature_phases = g.up ? 1 : std::min(g.sigma, g.w + 1);
  plan.pad = ceil_div(r, plan.feature_stride);
  plan.row_len = plan.padded + 2 * plan.pad;
  // Column cx * stride + d of x (cx the centre, d = kx - r) is element cx + floor(d / stride) + pad of
  // de-interleaved copy (d mod stride).
  for (int64_t kx = 0; kx < g.k; ++kx) {
    const int64_t d = kx - r, s = plan.feature_stride;
    const int64_t phase = ((d % s) + s) % s, shift = (d - phase) / s;
    plan.tap_offset.push_back(std::min(phase, plan.feature_phases - 1) * plan.row_len + shift + plan.pad);
  }
  return plan;
}

// dst[i] = src[i * stride] for i < count; strides 1 and 2 (the common cases) are constants the compiler vectorises.
template <typename T>
inline void copy_strided(const T* __restrict__ src, int64_t stride, int64_t count, T* __restrict__ dst) {
  if (stride == 1) {
    std::copy(src, src + count, dst);
  } else if (stride == 2) {
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i * 2];
  } else {
    for (int64_t i = 0; i < count; ++i) dst[i] = src[i * stride];
  }
}

// The sigma (or 1) de-interleaved, zero-padded copies of one feature row of width w.
template <typename T>
void prepare_feature_row(const ChannelsFirstPlan<T>& plan, const T* __restrict__ src, int64_t w,
                         T* __restrict__ dst) {
  const int64_t s = plan.feature_stride;
  for (int64_t phase = 0; phase < plan.feature_phases; ++phase) {
    T* row = dst + phase * plan.row_len;
    // Element t holds column (t - pad) * s + phase; those inside [0, w) are t in [lo, hi).
    const int64_t lo = std::min(plan.row_len, plan.pad);
    const int64_t hi = std::max(lo, std::min(plan.row_len, ceil_div(w - phase, s) + plan.pad));
    std::fill(row, row + lo, T(0));
    if (hi > lo) copy_strided(src + phase + (lo - plan.pad) * s, s, hi - lo, row + lo);
    std::fill(row + hi, row + plan.row_len, T(0));
  }
}

// Stores phases[ph][c] (ph < P, lane j = centre column j) as P * L consecutive output columns, lane j of phase ph
// at column j * P + ph; only the first `valid` columns are written.
template <typename T, int P, int C>
inline void store_phases(const Vector<T> (&phases)[P][C], int c, T* dst, int64_t valid) {
  using V = Vector<T>;
  constexpr int64_t L = kLanes<T>;
  alignas(64) T lanes[L * P];
  if constexpr (P == 1) {
    store(lanes, phases[0][c]);
  } else if constexpr (P == 2) {
    V low, high;
    interleave(phases[0][c], phases[1][c], low, high, std::make_index_sequence<L>{});
    store(lanes, low);
    store(lanes + L, high);
  } else {
    for (int ph = 0; ph < P; ++ph)
      for (int64_t i = 0; i < L; ++i) lanes[i * P + ph] = phases[ph][c][i];
  }
  if (valid >= L * P) {
    for (int i = 0; i < P; ++i) store(dst + i * L, load(lanes + i * L));
  } else {
    std::copy(lanes, lanes + valid, dst);
  }
}

template <typename T, int RB, int P, int CB>
void channels_first_block(const Geometry& g, const ChannelsFirstPlan<T>& plan, const T* mask_rows,
                          const T* const* feature_rows, int64_t feature_channel_stride, T* out_block,
                          int64_t out_channel_stride) {
  using V = Vector<T>;
  constexpr int64_t L = kLanes<T>;
  const int64_t k = g.k, taps = k * k, out_w = g.out_w;
  for (int64_t v = 0; v < plan.vectors; ++v) {
    V acc[RB][P][CB] = {};
    for (int64_t ky = 0; ky < k; ++ky) {
      if (feature_rows[ky] == nullptr) continue;
      for (int64_t kx = 0; kx < k; ++kx) {
        const int64_t tap = ky * k + kx;
        V weight[RB][P];
#pragma GCC unroll 16
        for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 16
          for (int ph = 0; ph < P; ++ph)
            weight[rb][ph] = load(mask_rows + ((rb * taps + tap) * P + ph) * plan.padded + v * L);
        const T* column = feature_rows[ky] + plan.tap_offset[kx] + v * L;
#pragma GCC unroll 16
        for (int c = 0; c < CB; ++c) {
          const V x = in_register(load(column + c * feature_channel_stride));
#pragma GCC unroll 16
          for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 16
            for (int ph = 0; ph < P; ++ph) acc[rb][ph][c] += weight[rb][ph] * x;
        }
      }
    }
    // Output columns [v * L * P, (v + 1) * L * P) of each row, phases interleaved; the last vector may be partial.
    const int64_t q0 = v * L * P;
#pragma GCC unroll 16
    for (int c = 0; c < CB; ++c) {
#pragma GCC unroll 16
      for (int rb = 0; rb < RB; ++rb) {
        store_phases<T, P>(acc[rb], c, out_block + c * out_channel_stride + rb * out_w + q0, out_w - q0);
      }
    }
  }
}

// Fills the weight buffer of one centre row: [group][row][tap][phase][row_len], centre column j at element
// left + j, zero where the tap falls outside the map, where the centre column is past the end, and in the padding.
template <typename T>
void prepare_weights(const Geometry& g, const ChannelsFirstPlan<T>& plan, const T* m_image, int64_t first_row,
                     int64_t row_len, int64_t left, T* __restrict__ dst) {
  const int64_t r = g.radius(), k = g.k, taps = k * k, plane = g.out_h * g.out_w;
  const int64_t stride = plan.feature_stride;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    for (int64_t rb = 0; rb < plan.rows_per_centre; ++rb) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t d = tap % k - r;
        // Centre column j reads x column j * stride + d: inside for j in [j_lo, j_hi).
        const int64_t j_lo = std::min(plan.centres, std::max<int64_t>(0, -floor_div(d, stride)));
        const int64_t j_hi = std::max(j_lo, std::min(plan.centres, floor_div(g.w - 1 - d, stride) + 1));
        const T* src = m_image + (grp * taps + tap) * plane + (first_row + rb) * g.out_w;
        for (int64_t ph = 0; ph < plan.phases; ++ph) {
          T* row = dst + (((grp * plan.rows_per_centre + rb) * taps + tap) * plan.phases + ph) * row_len;
          std::fill(row, row + left + j_lo, T(0));
          copy_strided(src + j_lo * plan.phases + ph, plan.phases, j_hi - j_lo, row + left + j_lo);
          std::fill(row + left + j_hi, row + row_len, T(0));
        }
      }
    }
  }
}

// The rows [first_row, first_row + rows) of one channel of an output-sized map, de-interleaved into `phases` rows
// each: dst[(row * phases + ph) * row_len + left + j] = src column j * phases + ph, zero elsewhere.
template <typename T>
void deinterleave_rows(const T* src, int64_t out_w, int64_t rows, int64_t phases, int64_t centres, int64_t row_len,
                       int64_t left, T* __restrict__ dst) {
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t ph = 0; ph < phases; ++ph) {
      T* d = dst + (row * phases + ph) * row_len;
      std::fill(d, d + left, T(0));
      copy_strided(src + row * out_w + ph, phases, centres, d + left);
      std::fill(d + left + centres, d + row_len, T(0));
    }
  }
}

// Walks the centre rows of every image in tiles for a channels-first kernel. A work item is a tile of consecutive
// centre rows of one image, sized so that the State's per-tile buffers take about 256 KB; State (one copy per
// thread) prepares what the whole tile shares in begin_tile, then for each block of channels the walk goes down the
// tile and visit() gets each centre row with the block's prepared feature rows, each read once, in order (reading
// the k rows of one centre for every channel in turn touches a new page per row and is several times slower).
template <typename T, typename State>
void walk_centre_tiles(const Geometry& g, const ChannelsFirstPlan<T>& plan, const T* x, int threads,
                       const State& prototype) {
  constexpr int64_t CB = State::kChannels;
  const int64_t k = g.k, r = g.radius(), cg = g.group_channels(), in_plane = g.h * g.w;
  const int64_t centre_rows = g.up ? g.h : g.out_h, row_step = g.up ? 1 : g.sigma;
  const int64_t row_stride = plan.feature_phases * plan.row_len, slot_stride = k * row_stride;
  const int64_t tiles = (centre_rows + prototype.tile - 1) / prototype.tile;
  parallel_for(g.n * tiles, threads, [&](int64_t begin, int64_t end) {
    State state = prototype;
    std::vector<T> ring(CB * slot_stride);  // [channel][slot = input row % k][prepared row]
    std::vector<int64_t> ring_row(k);
    const T* rows[64];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, first = item % tiles * state.tile;
      const int64_t last = std::min(first + state.tile, centre_rows);
      state.begin_tile(n, first, last);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        for (int64_t c0 = grp * cg; c0 < (grp + 1) * cg;) {
          const int64_t block = std::min(CB, (grp + 1) * cg - c0);
          std::fill(ring_row.begin(), ring_row.end(), int64_t{-1});
          for (int64_t centre = first; centre < last; ++centre) {
            const int64_t cy = g.up ? centre : centre * g.sigma;
            for (int64_t ky = 0; ky < k; ++ky) {
              const int64_t iy = cy + ky - r;
              if (iy < 0 || iy >= g.h) {
                rows[ky] = nullptr;
                continue;
              }
              T* slot = ring.data() + iy % k * row_stride;
              if (ring_row[iy % k] != iy) {
                for (int64_t c = 0; c < block; ++c) {
                  const T* src = x + (n * g.c + c0 + c) * in_plane + iy * g.w;
                  prepare_feature_row(plan, src, g.w, slot + c * slot_stride);
                  // The next centre row needs the rows below this one: start loading them now.
                  const int64_t ahead = std::min(g.h - 1 - iy, row_step) * g.w;
                  for (int64_t i = 0; i < g.w; i += 64 / sizeof(T)) __builtin_prefetch(src + ahead + i);
                }
                ring_row[iy % k] = iy;
              }
              rows[ky] = slot;
            }
            state.visit(n, centre - first, g.up ? centre * g.sigma : centre, grp, c0, block, rows, slot_stride);
          }
          c0 += block;
        }
      }
      state.end_tile(n, first, last);
    }
  });
}

// Rows per tile for per-row buffers of `bytes` each: about 256 KB of them, and at least 4 tiles per thread where
// the map allows, so that many threads share the work evenly.
inline int64_t tile_rows(const Geometry& g, int64_t bytes, int threads) {
  const int64_t rows = g.up ? g.h : g.out_h;
  const int64_t even_split = std::max<int64_t>(1, g.n * rows / (4 * std::max(threads, 1)));
  return std::clamp<int64_t>((int64_t{256} << 10) / std::max<int64_t>(bytes, 1), 1, std::min(rows, even_split));
}

// The forward: per tile, the weights of its centre rows; per visit, one register-tiled block.
template <typename T, int RB, int P>
struct ForwardTiles {
  static constexpr int64_t kChannels = channel_block(RB * P);
  const Geometry* g;
  const ChannelsFirstPlan<T>* plan;
  const T* m;
  T* out;
  int64_t per_centre, tile;
  std::vector<T> weights;

  ForwardTiles(const Geometry& geometry, const ChannelsFirstPlan<T>& p, const T* masks, T* output, int threads)
      : g(&geometry), plan(&p), m(masks), out(output),
        per_centre(geometry.groups * RB * geometry.taps() * P * p.padded),
        tile(tile_rows(geometry, per_centre * sizeof(T), threads)) {}

  void begin_tile(int64_t n, int64_t first, int64_t last) {
    weights.resize(tile * per_centre);
    for (int64_t centre = first; centre < last; ++centre) {
      prepare_weights(*g, *plan, m + n * g->mask_channels() * g->out_h * g->out_w, g->up ? centre * g->sigma : centre,
                      plan->padded, 0, weights.data() + (centre - first) * per_centre);
    }
  }

  void visit(int64_t n, int64_t index, int64_t first_row, int64_t grp, int64_t c0, int64_t block,
             const T* const* rows, int64_t slot_stride) {
    const int64_t out_plane = g->out_h * g->out_w;
    const T* w = weights.data() + index * per_centre + grp * (per_centre / g->groups);
    T* out_block = out + (n * g->c + c0) * out_plane + first_row * g->out_w;
    if (block == kChannels) {
      channels_first_block<T, RB, P, kChannels>(*g, *plan, w, rows, slot_stride, out_block, out_plane);
    } else {
      for (int64_t c = 0; c < block; ++c) {
        const T* channel_rows[64];
        for (int64_t ky = 0; ky < g->k; ++ky) channel_rows[ky] = rows[ky] ? rows[ky] + c * slot_stride : nullptr;
        channels_first_block<T, RB, P, 1>(*g, *plan, w, channel_rows, slot_stride, out_block + c * out_plane,
                                          out_plane);
      }
    }
  }

  void end_tile(int64_t, int64_t, int64_t) {}
};

// The mask gradient: for each tap, the sum over a group's channels of output gradient times feature. Per tile, a
// buffer of sums laid out like the forward's weights ([centre][group][row][tap][phase][centre column]); per visit,
// a block of channels sums its terms in registers and adds that to the buffer (a sum of block sums loses less
// precision over many channels than one running sum), the output gradient de-interleaved into phases so that one
// loaded vector serves several taps. The order of the additions is fixed, so the thread count does not change it.
template <typename T, int RB, int P>
struct MaskGradientTiles {
  static constexpr int64_t kChannels = 16;
  static constexpr int KX = std::max(1, (kVectorRegisters - RB * P - 2) / (RB * P));  // tap columns per pass
  const Geometry* g;
  const ChannelsFirstPlan<T>* plan;
  const T* grad_out;
  T* grad_m;
  int64_t per_centre, tile;
  std::vector<T> sums, grad_rows;

  MaskGradientTiles(const Geometry& geometry, const ChannelsFirstPlan<T>& p, const T* go, T* gm, int threads)
      : g(&geometry), plan(&p), grad_out(go), grad_m(gm),
        per_centre(geometry.groups * RB * geometry.taps() * P * p.padded),
        tile(tile_rows(geometry, per_centre * sizeof(T), threads)) {}

  void begin_tile(int64_t, int64_t, int64_t) {
    sums.assign(tile * per_centre, T(0));
    grad_rows.resize(kChannels * RB * P * plan->padded);
  }

  void visit(int64_t n, int64_t index, int64_t first_row, int64_t grp, int64_t c0, int64_t block,
             const T* const* rows, int64_t slot_stride) {
    using V = Vector<T>;
    constexpr int64_t L = kLanes<T>;
    const int64_t k = g->k, taps = k * k, padded = plan->padded, out_plane = g->out_h * g->out_w;
    for (int64_t c = 0; c < block; ++c) {
      deinterleave_rows(grad_out + (n * g->c + c0 + c) * out_plane + first_row * g->out_w, g->out_w, RB, P,
                        plan->centres, padded, 0, grad_rows.data() + c * RB * P * padded);
    }
    T* centre_sums = sums.data() + index * per_centre + grp * (per_centre / g->groups);
    for (int64_t ky = 0; ky < k; ++ky) {
      if (rows[ky] == nullptr) continue;
      for (int64_t kx0 = 0; kx0 < k; kx0 += KX) {
        const int64_t columns = std::min<int64_t>(KX, k - kx0);
        for (int64_t v = 0; v < plan->vectors; ++v) {
          V acc[RB][P][KX];
          auto sum_at = [&](int rb, int ph, int i) {
            return centre_sums + ((rb * taps + ky * k + kx0 + i) * P + ph) * padded + v * L;
          };
#pragma GCC unroll 16
          for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 16
            for (int ph = 0; ph < P; ++ph)
#pragma GCC unroll 16
              for (int i = 0; i < KX; ++i) acc[rb][ph][i] = V{};
          for (int64_t c = 0; c < block; ++c) {
            V grad[RB][P];
#pragma GCC unroll 16
            for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 16
              for (int ph = 0; ph < P; ++ph)
                grad[rb][ph] = in_register(load(grad_rows.data() + ((c * RB + rb) * P + ph) * padded + v * L));
            const T* feature_row = rows[ky] + c * slot_stride + v * L;
#pragma GCC unroll 16
            for (int i = 0; i < KX; ++i) {
              if (i >= columns) break;
              const V x = in_register(load(feature_row + plan->tap_offset[kx0 + i]));
#pragma GCC unroll 16
              for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 16
                for (int ph = 0; ph < P; ++ph) acc[rb][ph][i] += grad[rb][ph] * x;
            }
          }
#pragma GCC unroll 16
          for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 16
            for (int ph = 0; ph < P; ++ph)
#pragma GCC unroll 16
              for (int i = 0; i < KX; ++i)
                if (i < columns) store(sum_at(rb, ph, i), load(sum_at(rb, ph, i)) + acc[rb][ph][i]);
        }
      }
    }
  }

  // Writes the tile's sums to grad_m with the phases interleaved; taps outside the map get exactly zero.
  void end_tile(int64_t n, int64_t first, int64_t last) {
    using V = Vector<T>;
    constexpr int64_t L = kLanes<T>;
    const int64_t k = g->k, r = g->radius(), taps = k * k, padded = plan->padded, out_plane = g->out_h * g->out_w;
    const int64_t stride = plan->feature_stride;
    for (int64_t centre = first; centre < last; ++centre) {
      const int64_t cy = g->up ? centre : centre * g->sigma, first_row = g->up ? centre * g->sigma : centre;
      for (int64_t grp = 0; grp < g->groups; ++grp) {
        for (int64_t tap = 0; tap < taps; ++tap) {
          const int64_t iy = cy + tap / k - r, d = tap % k - r;
          const bool row_inside = iy >= 0 && iy < g->h;
          const int64_t j_lo = std::min(plan->centres, std::max<int64_t>(0, -floor_div(d, stride)));
          const int64_t j_hi = std::max(j_lo, std::min(plan->centres, floor_div(g->w - 1 - d, stride) + 1));
          for (int64_t rb = 0; rb < RB; ++rb) {
            T* s = sums.data() + (centre - first) * per_centre + ((grp * RB + rb) * taps + tap) * P * padded;
            for (int64_t ph = 0; ph < P; ++ph) {
              T* row = s + ph * padded;
              if (!row_inside) {
                std::fill(row, row + padded, T(0));
              } else {
                std::fill(row, row + j_lo, T(0));
                std::fill(row + j_hi, row + padded, T(0));
              }
            }
            T* dst = grad_m + (n * g->mask_channels() + grp * taps + tap) * out_plane + (first_row + rb) * g->out_w;
            for (int64_t v = 0; v < plan->vectors; ++v) {
              V phases[P][1];
              for (int64_t ph = 0; ph < P; ++ph) phases[ph][0] = load(s + ph * padded + v * L);
              store_phases<T, P>(phases, 0, dst + v * L * P, g->out_w - v * L * P);
            }
          }
        }
      }
    }
  }
};

template <typename T, int RB, int P>
void backward_masks_channels_first_tiled(const Geometry& g, const T* grad_out, const T* x, T* grad_m, int threads) {
  const ChannelsFirstPlan<T> plan = plan_channels_first<T>(g);
  walk_centre_tiles(g, plan, x, threads, MaskGradientTiles<T, RB, P>(g, plan, grad_out, grad_m, threads));
}

template <typename T, int RB, int P>
void forward_channels_first_tiled(const Geometry& g, const T* x, const T* m, T* out, int threads) {
  const ChannelsFirstPlan<T> plan = plan_channels_first<T>(g);
  walk_centre_tiles(g, plan, x, threads, ForwardTiles<T, RB, P>(g, plan, m, out, threads));
}

// The feature gradient as a gather. Input (iy, ix) is tap (ky, kx) of the outputs of centre (iy - ky + r,
// ix - kx + r) when up-sampling (sigma x sigma of them), and of output ((iy - ky + r) / sigma, (ix - kx + r) / sigma)
// where those divide when down-sampling. With the weights and output gradient of each centre row de-interleaved into
// phases and padded by r columns on each side, lane ix (up) or lane j of input phase ix = sigma j + phi (down) sums
// weight * gradient over taps, rows and phases in a fixed order (deterministic, independent of the thread count),
// and each loaded weight vector serves a block of channels. Work items are tiles of input rows; the weights of the
// centre rows a tile reads are prepared once, and each block of channels walks down the tile keeping the
// output-gradient rows of the last k centre rows in a ring.
template <typename T, int S, bool UP>
void backward_features_channels_first_tiled(const Geometry& g, const T* grad_out, const T* m, T* grad_x,
                                            int threads) {
  using V = Vector<T>;
  constexpr int RB = UP ? S : 1, P = UP ? S : 1, PHI = UP ? 1 : S, STEP = UP ? 1 : S;
  constexpr int64_t L = kLanes<T>, CB = 16 / PHI;
  const ChannelsFirstPlan<T> plan = plan_channels_first<T>(g);
  const int64_t k = g.k, r = g.radius(), taps = k * k, cg = g.group_channels(), centre_rows = UP ? g.h : g.out_h;
  const int64_t row_len = plan.padded + 2 * r, out_plane = g.out_h * g.out_w, in_plane = g.h * g.w;
  const int64_t per_centre = g.groups * RB * taps * P * row_len, per_group = per_centre / g.groups;
  const int64_t tile = tile_rows(g, per_centre * sizeof(T), threads);
  const int64_t tiles = (g.h + tile - 1) / tile, slot_stride = k * RB * P * row_len;
  parallel_for(g.n * tiles, threads, [&](int64_t begin, int64_t end) {
    std::vector<T> weights((tile + k) * per_centre);
    std::vector<T> ring(CB * slot_stride);  // [channel][slot = centre row % k][row][phase][row_len]
    std::vector<int64_t> ring_row(k);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, first = item % tiles * tile, last = std::min(first + tile, g.h);
      // Centre rows read by input rows [first, last): [lo, hi).
      const int64_t lo = std::max<int64_t>(0, -floor_div(-(first - (k - 1 - r)), STEP));
      const int64_t hi = std::min(centre_rows, floor_div(last - 1 + r, STEP) + 1);
      for (int64_t cy = lo; cy < hi; ++cy) {
        prepare_weights(g, plan, m + n * g.mask_channels() * out_plane, cy * RB, row_len, r,
                        weights.data() + (cy - lo) * per_centre);
      }
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        for (int64_t c0 = grp * cg; c0 < (grp + 1) * cg;) {
          const int64_t block = std::min(CB, (grp + 1) * cg - c0);
          std::fill(ring_row.begin(), ring_row.end(), int64_t{-1});
          for (int64_t iy = first; iy < last; ++iy) {
            const T* w_rows[64];
            const T* g_rows[64];
            for (int64_t ky = 0; ky < k; ++ky) {
              const int64_t d = iy - ky + r, cy = floor_div(d, STEP);
              w_rows[ky] = g_rows[ky] = nullptr;
              if (d < 0 || d % STEP != 0 || cy >= centre_rows) continue;
              T* slot = ring.data() + cy % k * RB * P * row_len;
              if (ring_row[cy % k] != cy) {
                for (int64_t c = 0; c < block; ++c) {
                  const T* src = grad_out + (n * g.c + c0 + c) * out_plane + cy * RB * g.out_w;
                  deinterleave_rows(src, g.out_w, RB, P, plan.centres, row_len, r, slot + c * slot_stride);
                  const int64_t ahead = (cy + 1 < centre_rows ? RB : 0) * g.out_w;
                  for (int64_t i = 0; i < RB * g.out_w; i += 64 / sizeof(T)) __builtin_prefetch(src + ahead + i);
                }
                ring_row[cy % k] = cy;
              }
              w_rows[ky] = weights.data() + (cy - lo) * per_centre + grp * per_group;
              g_rows[ky] = slot;
            }
            T* gx = grad_x + (n * g.c + c0) * in_plane + iy * g.w;
            for (int64_t v = 0; v < plan.vectors; ++v) {
              V acc[PHI][CB] = {};
              for (int64_t ky = 0; ky < k; ++ky) {
                if (w_rows[ky] == nullptr) continue;
                for (int64_t kx = 0; kx < k; ++kx) {
#pragma GCC unroll 16
                  for (int phi = 0; phi < PHI; ++phi) {
                    // The centre column of lane 0 is v * L + (phi - kx + r) / STEP, at element r past it.
                    const int64_t d = phi - kx + r;
                    if (d % STEP != 0) continue;
                    const int64_t offset = v * L + r + d / STEP;
#pragma GCC unroll 16
                    for (int rb = 0; rb < RB; ++rb) {
#pragma GCC unroll 16
                      for (int ph = 0; ph < P; ++ph) {
                        const V weight =
                            in_register(load(w_rows[ky] + ((rb * taps + ky * k + kx) * P + ph) * row_len + offset));
                        const T* gr = g_rows[ky] + (rb * P + ph) * row_len + offset;
                        if (block == CB) {
#pragma GCC unroll 16
                          for (int c = 0; c < CB; ++c) acc[phi][c] += weight * load(gr + c * slot_stride);
                        } else {
                          for (int64_t c = 0; c < block; ++c) acc[phi][c] += weight * load(gr + c * slot_stride);
                        }
                      }
                    }
                  }
                }
              }
              for (int64_t c = 0; c < block; ++c) {
                store_phases<T, PHI>(acc, static_cast<int>(c), gx + c * in_plane + v * L * PHI, g.w - v * L * PHI);
              }
            }
          }
          c0 += block;
        }
      }
    }
  });
}

template <int RB, int P>
struct RunFeatureGradient {
  template <typename T>
  static void call(const Geometry& g, const T* grad_out, const T* m, T* grad_x, int threads) {
    if (g.up) {
      backward_features_channels_first_tiled<T, RB, true>(g, grad_out, m, grad_x, threads);
    } else if (g.sigma == 1) {
      backward_features_channels_first_tiled<T, 1, false>(g, grad_out, m, grad_x, threads);
    } else if (g.sigma == 2) {
      backward_features_channels_first_tiled<T, 2, false>(g, grad_out, m, grad_x, threads);
    } else if (g.sigma == 3) {
      backward_features_channels_first_tiled<T, 3, false>(g, grad_out, m, grad_x, threads);
    } else {
      backward_features_channels_first_tiled<T, 4, false>(g, grad_out, m, grad_x, threads);
    }
  }
};

// Calls Run<RB, P>::template call<T> with the row and phase blocking of this geometry's channels-first kernels;
// false if there is none (sigma > 4 when up, or k > 64).
template <template <int, int> class Run, typename T, typename... Args>
bool dispatch_channels_first(const Geometry& g, Args... args) {
  if (g.k > 64) return false;
  if (!g.up || g.sigma == 1) {
    Run<1, 1>::template call<T>(g, args...);
  } else if (g.sigma == 2) {
    Run<2, 2>::template call<T>(g, args...);
  } else if (g.sigma == 3) {
    Run<3, 3>::template call<T>(g, args...);
  } else if (g.sigma == 4) {
    Run<4, 4>::template call<T>(g, args...);
  } else {
    return false;
  }
  return true;
}

template <int RB, int P>
struct RunForward {
  template <typename T>
  static void call(const Geometry& g, const T* x, const T* m, T* out, int threads) {
    forward_channels_first_tiled<T, RB, P>(g, x, m, out, threads);
  }
};

template <int RB, int P>
struct RunMaskGradient {
  template <typename T>
  static void call(const Geometry& g, const T* grad_out, const T* x, T* grad_m, int threads) {
    backward_masks_channels_first_tiled<T, RB, P>(g, grad_out, x, grad_m, threads);
  }
};

// The taps of one output window of channels-last rows: rows[ky] (valid for ky in [ky0, ky1)) and tap columns
// [kx0, kx1), each tap column c_stride elements after the previous one.
template <typename T>
struct WindowOf {
  const T* const* rows;
  int64_t ky0, ky1, kx0, kx1, k, c_stride;
};

// Channels per call of reassemble_shared_centre: whole vectors, as many as leave registers for S outputs.
template <typename T>
constexpr int64_t shared_centre_channels(int outputs) {
  const int64_t fit = (kVectorRegisters - 2 * outputs) / (outputs + 1);
  return std::max<int64_t>(1, std::min<int64_t>(kBlock<T> / kLanes<T>, fit)) * kLanes<T>;
}

// The S outputs that share one centre column (channels-last), over shared_centre_channels<T>(4) channels starting
// at x_base in the window's rows: each loaded feature vector serves the S outputs' weights, accumulators stay in
// registers. masks[s] are output s's taps, dsts[s] + sub where its channels go.
template <typename T, int S>
inline void reassemble_shared_centre(const WindowOf<T>& w, int64_t x_base, const T* const* masks, T* const* dsts,
                                     int64_t sub) {
  using V = Vector<T>;
  constexpr int64_t L = kLanes<T>, NV = shared_centre_channels<T>(4) / L;
  V acc[S][NV] = {};
  for (int64_t ky = w.ky0; ky < w.ky1; ++ky) {
    const T* row = w.rows[ky] + x_base;
    for (int64_t kx = w.kx0; kx < w.kx1; ++kx) {
      V weight[S];
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) weight[s] = V{} + masks[s][ky * w.k + kx];
      const T* features = row + kx * w.c_stride;
#pragma GCC unroll 16
      for (int64_t j = 0; j < NV; ++j) {
        const V x = load(features + j * L);
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) acc[s][j] += weight[s] * x;
      }
    }
  }
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int64_t j = 0; j < NV; ++j) store(dsts[s] + sub + j * L, acc[s][j]);
}

struct Layouts {
  bool a_channels_first, b_channels_first, out_channels_first;
};

template <typename T>
void forward(const Geometry& g, const T* x, const T* m, T* out, Layouts layout, int threads) {
  if (layout.a_channels_first && layout.b_channels_first && layout.out_channels_first &&
      dispatch_channels_first<RunForward, T>(g, x, m, out, threads)) {
    return;
  }
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
      // Consecutive outputs of a row that share a centre column (sigma of them when up-sampling) go together.
      const int64_t shared = g.up ? g.sigma : 1;
      for (int64_t q0 = 0; q0 < g.out_w; q0 += shared) {
        const int64_t cx = g.centre(q0);
        const int64_t kx0 = std::max<int64_t>(0, r - cx), kx1 = std::min<int64_t>(k, g.w - cx + r);
        const WindowOf<T> window{x_rows.data(), ky0, ky1, kx0, kx1, k, g.c};
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          for (int64_t cb = 0; cb < cg; cb += kBlock<T>) {
            const int64_t len = std::min(kBlock<T>, cg - cb), offset = grp * cg + cb;
            const T* masks[4];
            T* dsts[4];
            for (int64_t s = 0; s < std::min<int64_t>(shared, 4); ++s) {
              masks[s] = mask_row + (q0 + s) * mc + grp * g.taps();
              dsts[s] = out_row + (q0 + s) * g.c + offset;
            }
            const int64_t x_base = (cx - r) * g.c + offset;
            if (len % shared_centre_channels<T>(4) == 0 && shared <= 4) {
              for (int64_t sub = 0; sub < len; sub += shared_centre_channels<T>(4)) {
                switch (shared) {
                  case 1: reassemble_shared_centre<T, 1>(window, x_base + sub, masks, dsts, sub); break;
                  case 2: reassemble_shared_centre<T, 2>(window, x_base + sub, masks, dsts, sub); break;
                  case 3: reassemble_shared_centre<T, 3>(window, x_base + sub, masks, dsts, sub); break;
                  default: reassemble_shared_centre<T, 4>(window, x_base + sub, masks, dsts, sub); break;
                }
              }
              continue;
            }
            for (int64_t q = q0; q < std::min(q0 + shared, g.out_w); ++q) {
              const T* mask = mask_row + q * mc + grp * g.taps();
              std::fill(acc, acc + len, T(0));
              for (int64_t ky = ky0; ky < ky1; ++ky) {
                for (int64_t kx = kx0; kx < kx1; ++kx) {
                  axpy(acc, mask[ky * k + kx], x_rows[ky] + x_base + kx * g.c, len);
                }
              }
              std::copy(acc, acc + len, out_row + q * g.c + offset);
            }
          }
        }
      }
      outs.commit(n, p);
    }
  });
}

template <typename T>
void backward_features(const Geometry& g, const T* grad_out, const T* m, T* grad_x, Layouts layout, int threads) {
  if (layout.a_channels_first && layout.b_channels_first && layout.out_channels_first &&
      (g.up || g.sigma <= 4) && dispatch_channels_first<RunFeatureGradient, T>(g, grad_out, m, grad_x, threads)) {
    return;
  }
  const int64_t r = g.radius(), k = g.k, cg = g.group_channels(), mc = g.mask_channels();
  const int64_t window = g.output_rows_per_input_row();
  parallel_for(g.n * g.h, threads, [&](int64_t begin, int64_t end) {
    RowReader<T> gos(grad_out, g.out_h, g.out_w, g.c, layout.a_channels_first, window);
    RowReader<T> ms(m, g.out_h, g.out_w, mc, layout.b_channels_first, window);
    RowWriter<T> gxs(grad_x, g.h, g.w, g.c, layout.out_channels_first);
    // For each tap row ky: the output rows [p_lo, p_hi) that read input row iy through it, and their data.
    std::vector<int64_t> p_lo(k), p_hi(k);
    // Outputs per centre row: sigma when up-sampling, one when down-sampling (however large sigma is).
    const int64_t per_centre = g.up ? g.sigma : 1;
    std::vector<const T*> go_rows(k * per_centre), mask_rows(k * per_centre);
    alignas(64) T acc[kBlock<T>];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.h, iy = row % g.h;
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t cy = iy - ky + r;
        p_lo[ky] = p_hi[ky] = 0;
        if (cy >= 0 && cy < g.h) g.outputs_centred_at(cy, g.out_h, p_lo[ky], p_hi[ky]);
        for (int64_t p = p_lo[ky]; p < p_hi[ky]; ++p) {
          go_rows[ky * per_centre + p - p_lo[ky]] = gos.row(n, p);
          mask_rows[ky * per_centre + p - p_lo[ky]] = ms.row(n, p);
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
                  const T* go_row = go_rows[ky * per_centre + j];
                  const T* mask_row = mask_rows[ky * per_centre + j];
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
  if (layout.a_channels_first && layout.b_channels_first && layout.out_channels_first &&
      dispatch_channels_first<RunMaskGradient, T>(g, grad_out, x, grad_m, threads)) {
    return;
  }
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

// Asks the kernel to back the whole 2 MiB pages inside a freshly allocated result with transparent huge pages
// (where the system leaves that to madvise). Every call writes a result the allocator has just mapped, and on a
// 33 MB result faulting in 4 KiB pages took longer than the reassembly itself; huge pages cut that cost several
// times. Advice only: a failure, or memory already backed, changes nothing.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < int64_t{4} * static_cast<int64_t>(kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
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
    advise_huge_pages(out, n * c * out_h * out_w * int64_t{sizeof(T)});                                           \
    CARAFE_CALL(forward<T>, x, m, out);                                                                           \
  }                                                                                                               \
  extern "C" void carafe_backward_features_##SUFFIX(const T* grad_out, const T* m, T* grad_x, CARAFE_ARGS) {      \
    advise_huge_pages(grad_x, n * c * h * w * int64_t{sizeof(T)});                                                \
    CARAFE_CALL(backward_features<T>, grad_out, m, grad_x);                                                       \
  }                                                                                                               \
  extern "C" void carafe_backward_masks_##SUFFIX(const T* grad_out, const T* x, T* grad_m, CARAFE_ARGS) {         \
    advise_huge_pages(grad_m, n * groups * k * k * out_h * out_w * int64_t{sizeof(T)});                           \
    CARAFE_CALL(backward_masks<T>, grad_out, x, grad_m);                                                          \
  }

CARAFE_EXPORT(float, f32)
CARAFE_EXPORT(double, f64)
