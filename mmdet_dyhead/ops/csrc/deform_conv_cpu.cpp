// Modulated deformable convolution (DCNv2) on CPU: forward and backward.
//
// groups = 1, deform_groups = 1, float32 and float64, NCHW tensors. The
// semantics are mmcv's DCNv2 kernel's: tap k = i * kw + j of output pixel
// (ho, wo) reads the input at
//   y = ho * stride_h - pad_h + i * dil_h + offset[2k],
//   x = wo * stride_w - pad_w + j * dil_w + offset[2k + 1]
// by bilinear interpolation over the in-map corners, times mask[k]. A tap
// whose position is not strictly inside (-1, H) x (-1, W) reads 0 and gets
// no gradient at all; offset gradients are the one-sided slopes of the
// floor-based corners (also at integer positions).
//
// Layout of the work (why it is fast on a CPU):
// - The input is read channels-last (one transposing copy per call), so a
//   tap is four contiguous rows of C_in values combined with four weights,
//   vectorised over channels.
// - Output pixels are cut into tiles whose sampled columns (P x K*C_in) stay
//   in cache; each tile's product with the weight is one ATen GEMM.
// - One parallel region runs all tiles of a call, a contiguous run of tiles
//   per thread (see TileQueue): many short regions stall whenever a thread
//   is descheduled. The backward adds one short region that sums the
//   threads' input gradients and writes them NCHW.
// - The backward computes the column gradient of a tile with one GEMM and
//   consumes it at once: input gradient scattered into per-thread
//   accumulators that cover only the input rows its taps touch, offset and
//   mask gradients in closed form from four dot products per tap, weight
//   gradient accumulated per thread and summed at the end. For a given
//   thread count the results do not depend on timing.
// - Indices are int64 throughout.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Target size of a tile's column buffer: a few MB keeps the sampled
// columns in L2/L3 between the sampling and the GEMM that reads them.
// 512 output pixels of a 256-channel 3x3 layer in float32 (4.5 MiB), the
// chunk size the native path measured best (docs/design.md); a sweep of the
// GEMM alone (2-core AMD EPYC, loaded) put 512-1024 ahead of 128-256.
constexpr int64_t kTileBytes = int64_t(512) * 9 * 256 * 4;
constexpr int64_t kMinTile = 32;
constexpr int64_t kMaxTile = 2048;

// The vector loops run once per tap over C_in channels. A distributed build
// cannot assume AVX2, so on x86-64 Linux GCC they are compiled twice and
// the loader picks the AVX2+FMA copy where the CPU has it.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    !defined(__clang__)
#define DCN_VECTOR_CLONES \
  __attribute__((target_clones("arch=haswell", "default")))
#else
#define DCN_VECTOR_CLONES
#endif

// dst = a0 * r0 + a1 * r1 + a2 * r2 + a3 * r3 (the sampled column of a tap).
template <typename T>
DCN_VECTOR_CLONES void blend4(T* __restrict dst, const T* __restrict r0,
                              const T* __restrict r1, const T* __restrict r2,
                              const T* __restrict r3, T a0, T a1, T a2, T a3,
                              int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    dst[c] = a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c];
  }
}

// The backward's pass over one tap: the sampled column (for the weight
// gradient), the four dot products <g, r_i> (offset and mask gradients) and
// the input-gradient scatter gi_i += a_i * g, in one sweep over channels.
template <typename T>
DCN_VECTOR_CLONES void tap_backward(
    const T* __restrict g, const T* __restrict r0, const T* __restrict r1,
    const T* __restrict r2, const T* __restrict r3, T a0, T a1, T a2, T a3,
    T* __restrict col, T* __restrict gi0, T* __restrict gi1,
    T* __restrict gi2, T* __restrict gi3, T* dots, int64_t n) {
  constexpr int64_t L = 8;  // independent partial sums: vectorisable
  T s0[L] = {}, s1[L] = {}, s2[L] = {}, s3[L] = {};
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    for (int64_t l = 0; l < L; ++l) {
      const T gv = g[c + l];
      const T v0 = r0[c + l], v1 = r1[c + l], v2 = r2[c + l],
              v3 = r3[c + l];
      col[c + l] = a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3;
      s0[l] += gv * v0;
      s1[l] += gv * v1;
      s2[l] += gv * v2;
      s3[l] += gv * v3;
      gi0[c + l] += a0 * gv;
      gi1[c + l] += a1 * gv;
      gi2[c + l] += a2 * gv;
      gi3[c + l] += a3 * gv;
    }
  }
  for (; c < n; ++c) {
    const T gv = g[c];
    const T v0 = r0[c], v1 = r1[c], v2 = r2[c], v3 = r3[c];
    col[c] = a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3;
    s0[0] += gv * v0;
    s1[0] += gv * v1;
    s2[0] += gv * v2;
    s3[0] += gv * v3;
    gi0[c] += a0 * gv;
    gi1[c] += a1 * gv;
    gi2[c] += a2 * gv;
    gi3[c] += a3 * gv;
  }
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  for (int64_t l = 0; l < L; ++l) {
    d0 += s0[l];
    d1 += s1[l];
    d2 += s2[l];
    d3 += s3[l];
  }
  dots[0] = d0;
  dots[1] = d1;
  dots[2] = d2;
  dots[3] = d3;
}

struct Geometry {
  int64_t batch, in_channels, height, width;
  int64_t out_channels, kernel_h, kernel_w, taps;
  int64_t out_h, out_w, out_pixels;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t tile, tiles_per_sample, num_tiles;
};

// One tap's bilinear read. Corners are ordered (y0, x0), (y0, x1), (y1, x0),
// (y1, x1); ``pixel`` is the corner's row in the channels-last input
// ((n * H + y) * W + x), or -1 when the corner is outside the map.
template <typename T>
struct Tap {
  bool inside;   // position strictly inside (-1, H) x (-1, W)
  T ly, lx;      // fractional parts of the position
  T mask;
  int64_t pixel[4];
};

// Tap k = i * kw + j of output pixel p = (ho, wo) of sample n.
template <typename T>
inline Tap<T> make_tap(const Geometry& g, const T* offset, const T* mask,
                       int64_t n, int64_t p, int64_t ho, int64_t wo,
                       int64_t i, int64_t j) {
  Tap<T> tap;
  const int64_t k = i * g.kernel_w + j;
  const int64_t plane = g.out_pixels;
  const T* off = offset + (n * 2 * g.taps + 2 * k) * plane + p;
  // As mmcv: the integer base position plus the offset, in T.
  const T y = static_cast<T>(ho * g.stride_h - g.pad_h + i * g.dil_h) + off[0];
  const T x =
      static_cast<T>(wo * g.stride_w - g.pad_w + j * g.dil_w) + off[plane];
  tap.mask = mask[(n * g.taps + k) * plane + p];
  tap.inside = y > T(-1) && y < T(g.height) && x > T(-1) && x < T(g.width);
  if (!tap.inside) {
    tap.ly = tap.lx = T(0);
    for (int c = 0; c < 4; ++c) tap.pixel[c] = -1;
    return tap;
  }
  const T fy = std::floor(y), fx = std::floor(x);
  tap.ly = y - fy;
  tap.lx = x - fx;
  const int64_t y0 = static_cast<int64_t>(fy), x0 = static_cast<int64_t>(fx);
  const int64_t ys[2] = {y0, y0 + 1}, xs[2] = {x0, x0 + 1};
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2; ++b) {
      const bool in = ys[a] >= 0 && ys[a] < g.height && xs[b] >= 0 &&
                      xs[b] < g.width;
      tap.pixel[2 * a + b] =
          in ? (n * g.height + ys[a]) * g.width + xs[b] : int64_t(-1);
    }
  }
  return tap;
}

void check_inputs(const at::Tensor& input, const at::Tensor& offset,
                  const at::Tensor& mask, const at::Tensor& weight,
                  int64_t stride_h, int64_t stride_w, int64_t pad_h,
                  int64_t pad_w, int64_t dil_h, int64_t dil_w,
                  const char* fn) {
  TORCH_CHECK(input.device().is_cpu(), fn,
              ": the C++ DCN kernel runs on CPU tensors, got input on ",
              input.device(), "; use mmcv's kernel on CUDA.");
  TORCH_CHECK(input.scalar_type() == at::kFloat ||
                  input.scalar_type() == at::kDouble,
              fn, ": input must be float32 or float64, got ",
              input.scalar_type(), "; cast it (and offset, mask, weight).");
  for (const auto* t : {&offset, &mask, &weight}) {
    TORCH_CHECK(t->device().is_cpu(), fn,
                ": offset, mask and weight must be CPU tensors like input.");
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), fn,
                ": offset, mask and weight must have the input's dtype (",
                input.scalar_type(), "), got ", t->scalar_type(),
                "; cast them first.");
  }
  TORCH_CHECK(input.dim() == 4, fn, ": input must be (N, C_in, H, W), got ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, fn,
              ": weight must be (C_out, C_in, kh, kw), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == input.size(1), fn, ": weight expects ",
              weight.size(1), " input channels but input has ", input.size(1),
              " (groups=1 only).");
  TORCH_CHECK(stride_h > 0 && stride_w > 0 && dil_h > 0 && dil_w > 0 &&
                  pad_h >= 0 && pad_w >= 0,
              fn, ": stride and dilation must be > 0 and padding >= 0, got "
              "stride (", stride_h, ", ", stride_w, "), padding (", pad_h,
              ", ", pad_w, "), dilation (", dil_h, ", ", dil_w, ").");
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(kh > 0 && kw > 0, fn, ": the kernel must be at least 1x1, got ",
              weight.sizes());
  const int64_t ho =
      (input.size(2) + 2 * pad_h - dil_h * (kh - 1) - 1) / stride_h + 1;
  const int64_t wo =
      (input.size(3) + 2 * pad_w - dil_w * (kw - 1) - 1) / stride_w + 1;
  TORCH_CHECK(ho > 0 && wo > 0, fn, ": input ", input.sizes(),
              " is too small for a ", kh, "x", kw,
              " kernel with this padding/dilation (output would be ", ho,
              "x", wo, ").");
  const int64_t n = input.size(0);
  TORCH_CHECK(offset.dim() == 4 && offset.size(0) == n &&
                  offset.size(1) == 2 * kh * kw && offset.size(2) == ho &&
                  offset.size(3) == wo,
              fn, ": offset must be (N, 2*kh*kw, H_out, W_out) = (", n, ", ",
              2 * kh * kw, ", ", ho, ", ", wo, ") (one deform group), got ",
              offset.sizes());
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == n &&
                  mask.size(1) == kh * kw && mask.size(2) == ho &&
                  mask.size(3) == wo,
              fn, ": mask must be (N, kh*kw, H_out, W_out) = (", n, ", ",
              kh * kw, ", ", ho, ", ", wo, "), got ", mask.sizes());
}

Geometry make_geometry(const at::Tensor& input, const at::Tensor& weight,
                       int64_t stride_h, int64_t stride_w, int64_t pad_h,
                       int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  Geometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.taps = g.kernel_h * g.kernel_w;
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dil_h = dil_h;
  g.dil_w = dil_w;
  g.out_h = (g.height + 2 * pad_h - dil_h * (g.kernel_h - 1) - 1) / stride_h +
            1;
  g.out_w = (g.width + 2 * pad_w - dil_w * (g.kernel_w - 1) - 1) / stride_w +
            1;
  g.out_pixels = g.out_h * g.out_w;
  // Tile: about kTileBytes of columns, but small enough that every thread
  // gets tiles when the maps are small.
  const int64_t row_bytes =
      std::max<int64_t>(1, g.taps * g.in_channels) * input.element_size();
  int64_t tile = std::clamp(kTileBytes / row_bytes, kMinTile, kMaxTile);
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t per_thread =
      (g.batch * g.out_pixels + threads - 1) / threads;  // pixels
  tile = std::max<int64_t>(1, std::min({tile, per_thread, g.out_pixels}));
  // Threads get contiguous runs of tiles: make the tile count a multiple of
  // the thread count where that needs at most a few more tiles, so that no
  // thread runs one tile more than the others.
  int64_t per_sample = (g.out_pixels + tile - 1) / tile;
  for (int64_t more = per_sample;
       more <= std::min(g.out_pixels, per_sample + threads); ++more) {
    if ((g.batch * more) % threads == 0) {
      per_sample = more;
      break;
    }
  }
  tile = (g.out_pixels + per_sample - 1) / per_sample;
  g.tile = tile;
  g.tiles_per_sample = (g.out_pixels + tile - 1) / tile;
  g.num_tiles = g.batch * g.tiles_per_sample;
  TORCH_CHECK(g.num_tiles < (int64_t(1) << 31),
              "DCN kernel: too many output tiles (", g.num_tiles,
              "); split the batch.");
  return g;
}

// The weight as (C_out, K * C_in) with columns ordered (tap, channel), the
// order of a tile's columns.
at::Tensor weight_matrix(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1})
      .reshape({weight.size(0), -1})
      .contiguous();
}

// Calls fn(p, ho, wo, i, j) for every tap of output pixels [p0, p1), pixel
// by pixel (no divisions per tap).
template <typename F>
inline void for_each_tap(const Geometry& g, int64_t p0, int64_t p1, F fn) {
  int64_t ho = p0 / g.out_w, wo = p0 % g.out_w;
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      for (int64_t j = 0; j < g.kernel_w; ++j) fn(p, ho, wo, i, j);
    }
    if (++wo == g.out_w) {
      wo = 0;
      ++ho;
    }
  }
}

// The tiles of a call, split over workers (one per thread). Worker w owns a
// contiguous run and takes tiles from its front. With ``steal``, a worker
// whose run is done takes tiles from the back of another's: without
// contention this is still the static split (each thread reads and writes
// one contiguous part of the maps), and when a thread is descheduled the
// others finish its tiles instead of waiting for it at the end of the
// region. The forward steals (its tiles write disjoint outputs, so the
// result does not depend on who computes them); the backward does not: its
// per-worker sums must add up in the same order on every run.
class TileQueue {
 public:
  TileQueue(int64_t num_tiles, int64_t workers, bool steal)
      : runs_(workers), steal_(steal) {
    for (int64_t w = 0; w < workers; ++w) {
      runs_[w].store(pack(num_tiles * w / workers,
                          num_tiles * (w + 1) / workers));
    }
  }

  // The next tile for worker w, or -1 when every tile is taken.
  int64_t next(int64_t w) {
    const int64_t n = static_cast<int64_t>(runs_.size());
    int64_t t = take(runs_[w], /*front=*/true);
    for (int64_t k = 1; steal_ && t < 0 && k < n; ++k) {
      t = take(runs_[(w + k) % n], /*front=*/false);
    }
    return t;
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) {
    return (static_cast<uint64_t>(front) << 32) | static_cast<uint64_t>(back);
  }

  static int64_t take(std::atomic<uint64_t>& run, bool front) {
    uint64_t cur = run.load();
    while (true) {
      const int64_t f = static_cast<int64_t>(cur >> 32);
      const int64_t b = static_cast<int64_t>(cur & 0xffffffffu);
      if (f >= b) return -1;
      const uint64_t want = front ? pack(f + 1, b) : pack(f, b - 1);
      if (run.compare_exchange_weak(cur, want)) return front ? f : b - 1;
    }
  }

  std::vector<std::atomic<uint64_t>> runs_;
  const bool steal_;
};

int64_t num_workers(const Geometry& g) {
  return std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), g.num_tiles));
}

template <typename T>
void forward_tiles(const Geometry& g, const T* input_cl, const T* offset,
                   const T* mask, const at::Tensor& wmat, const T* bias,
                   at::Tensor& output) {
  const int64_t C = g.in_channels, K = g.taps, Co = g.out_channels;
  const int64_t row_len = K * C;
  // Rows read by absent corners: zeros, so a tap is always four rows.
  const std::vector<T> zeros(C, T(0));
  const int64_t workers = num_workers(g);
  TileQueue queue(g.num_tiles, workers, /*steal=*/true);
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    at::Tensor cols = at::empty({g.tile, row_len}, output.options());
    T* cols_ptr = cols.data_ptr<T>();
    for (int64_t w = first; w < last; ++w) {
      for (int64_t t = queue.next(w); t >= 0; t = queue.next(w)) {
        const int64_t n = t / g.tiles_per_sample;
        const int64_t p0 = (t % g.tiles_per_sample) * g.tile;
        const int64_t p1 = std::min(g.out_pixels, p0 + g.tile);
        for_each_tap(g, p0, p1, [&](int64_t p, int64_t ho, int64_t wo,
                                    int64_t i, int64_t j) {
          const int64_t k = i * g.kernel_w + j;
          T* dst = cols_ptr + ((p - p0) * K + k) * C;
          const Tap<T> tap = make_tap(g, offset, mask, n, p, ho, wo, i, j);
          if (!tap.inside) {
            std::fill(dst, dst + C, T(0));
            return;
          }
          const T* r[4];
          for (int c = 0; c < 4; ++c) {
            r[c] =
                tap.pixel[c] < 0 ? zeros.data() : input_cl + tap.pixel[c] * C;
          }
          const T hy = T(1) - tap.ly, ly = tap.ly;
          const T hx = T(1) - tap.lx, lx = tap.lx;
          const T m = tap.mask;
          blend4(dst, r[0], r[1], r[2], r[3], m * (hy * hx), m * (hy * lx),
                 m * (ly * hx), m * (ly * lx), C);
        });
        at::Tensor out_tile = output[n].view({Co, g.out_pixels}).narrow(
            1, p0, p1 - p0);
        at::mm_out(out_tile, wmat, cols.narrow(0, 0, p1 - p0).t());
        if (bias != nullptr) {
          T* out_ptr = output.data_ptr<T>() + n * Co * g.out_pixels;
          for (int64_t o = 0; o < Co; ++o) {
            T* row = out_ptr + o * g.out_pixels;
            for (int64_t p = p0; p < p1; ++p) row[p] += bias[o];
          }
        }
      }
    }
  });
}

// What one worker of the backward leaves for the reduction. Its input
// gradient is kept in bands of input rows (row = n * H + y), allocated when
// a tap first touches them: a worker's tiles are one contiguous run, so all
// workers together hold about one copy of the input, not one each.
template <typename T>
struct WorkerGrads {
  std::vector<std::vector<T>> bands;  // band b: rows [b * B, (b + 1) * B)
  at::Tensor grad_weight;             // (C_out, K * C_in)
};

struct Bands {
  int64_t rows;  // B, input rows per band
  int64_t count;
};

Bands make_bands(const Geometry& g, int64_t element_size) {
  // About 1 MiB per band.
  const int64_t row_bytes =
      std::max<int64_t>(1, g.width * g.in_channels * element_size);
  const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 20) / row_bytes);
  const int64_t total = g.batch * g.height;
  return {rows, (total + rows - 1) / rows};
}

template <typename T>
void backward_tiles(const Geometry& g, const Bands& bands, const T* input_cl,
                    const T* offset, const T* mask, const at::Tensor& wmat,
                    const at::Tensor& grad_out, T* grad_offset, T* grad_mask,
                    std::vector<WorkerGrads<T>>& grads) {
  const int64_t C = g.in_channels, K = g.taps, Co = g.out_channels;
  const int64_t row_len = K * C;
  const int64_t band_size = bands.rows * g.width * C;
  const std::vector<T> zeros(C, T(0));
  const int64_t workers = static_cast<int64_t>(grads.size());
  TileQueue queue(g.num_tiles, workers, /*steal=*/false);
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    // Scatter targets of absent corners: one per corner (the scatter's
    // pointers must not alias), never read.
    std::vector<T> sink(4 * C);
    at::Tensor cols = at::empty({g.tile, row_len}, grad_out.options());
    at::Tensor grad_cols = at::empty({g.tile, row_len}, grad_out.options());
    T* cols_ptr = cols.data_ptr<T>();
    T* gcols_ptr = grad_cols.data_ptr<T>();
    const int64_t plane = g.out_pixels;
    for (int64_t w = first; w < last; ++w) {
      WorkerGrads<T>& mine = grads[w];
      mine.bands.resize(bands.count);
      mine.grad_weight = at::zeros({Co, row_len}, grad_out.options());
      // Where corner pixel q of the input accumulates its gradient.
      auto grad_row = [&](int64_t q) -> T* {
        const int64_t row = q / g.width;
        std::vector<T>& band = mine.bands[row / bands.rows];
        if (band.empty()) band.assign(band_size, T(0));
        return band.data() + (q - (row / bands.rows) * bands.rows * g.width) * C;
      };
      for (int64_t t = queue.next(w); t >= 0; t = queue.next(w)) {
        const int64_t n = t / g.tiles_per_sample;
        const int64_t p0 = (t % g.tiles_per_sample) * g.tile;
        const int64_t p1 = std::min(g.out_pixels, p0 + g.tile);
        const int64_t np = p1 - p0;
        at::Tensor go = grad_out[n].view({Co, plane}).narrow(1, p0, np);
        at::Tensor gcols_tile = grad_cols.narrow(0, 0, np);
        at::mm_out(gcols_tile, go.t(), wmat);  // (P, K * C_in)
        for_each_tap(g, p0, p1, [&](int64_t p, int64_t ho, int64_t wo,
                                    int64_t i, int64_t j) {
          const int64_t k = i * g.kernel_w + j;
          const int64_t slot = (p - p0) * K + k;
          T* col = cols_ptr + slot * C;
          const T* gc = gcols_ptr + slot * C;
          T* g_off = grad_offset + (n * 2 * K + 2 * k) * plane + p;
          T* g_mask = grad_mask + (n * K + k) * plane + p;
          const Tap<T> tap = make_tap(g, offset, mask, n, p, ho, wo, i, j);
          if (!tap.inside) {
            std::fill(col, col + C, T(0));
            g_off[0] = g_off[plane] = *g_mask = T(0);
            return;
          }
          const T* r[4];
          T* gi[4];
          for (int c = 0; c < 4; ++c) {
            if (tap.pixel[c] < 0) {
              r[c] = zeros.data();
              gi[c] = sink.data() + c * C;
            } else {
              r[c] = input_cl + tap.pixel[c] * C;
              gi[c] = grad_row(tap.pixel[c]);
            }
          }
          const T hy = T(1) - tap.ly, ly = tap.ly;
          const T hx = T(1) - tap.lx, lx = tap.lx;
          const T m = tap.mask;
          T d[4];
          tap_backward(gc, r[0], r[1], r[2], r[3], m * (hy * hx),
                       m * (hy * lx), m * (ly * hx), m * (ly * lx), col,
                       gi[0], gi[1], gi[2], gi[3], d, C);
          // d[c] = <column gradient, corner c>; absent corners give 0.
          *g_mask = hy * hx * d[0] + hy * lx * d[1] + ly * hx * d[2] +
                    ly * lx * d[3];
          g_off[0] = m * (hx * (d[2] - d[0]) + lx * (d[3] - d[1]));
          g_off[plane] = m * (hy * (d[1] - d[0]) + ly * (d[3] - d[2]));
        });
        mine.grad_weight.addmm_(go, cols.narrow(0, 0, np));
      }
    }
  });
}

// grad_input (N, C, H, W) = the sum of the workers' channels-last bands.
template <typename T>
void reduce_grad_input(const Geometry& g, const Bands& bands,
                       const std::vector<WorkerGrads<T>>& grads,
                       T* grad_input) {
  const int64_t C = g.in_channels, W = g.width, H = g.height;
  const int64_t row_size = W * C;
  at::parallel_for(0, g.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(row_size);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t band = r / bands.rows;
      const int64_t at_row = (r - band * bands.rows) * row_size;
      for (const auto& worker : grads) {
        if (worker.bands.empty() || worker.bands[band].empty()) continue;
        const T* src = worker.bands[band].data() + at_row;
        for (int64_t i = 0; i < row_size; ++i) acc[i] += src[i];
      }
      const int64_t n = r / H, y = r % H;
      T* dst = grad_input + (n * C * H + y) * W;
      for (int64_t c = 0; c < C; ++c) {
        T* out_row = dst + c * H * W;
        for (int64_t x = 0; x < W; ++x) out_row[x] = acc[x * C + c];
      }
    }
  });
}

at::Tensor channels_last_rows(const at::Tensor& input) {
  // (N, H, W, C) contiguous: one pixel's channels are one row.
  return input.permute({0, 2, 3, 1}).contiguous();
}

}  // namespace

at::Tensor dcn_forward(const at::Tensor& input_, const at::Tensor& offset_,
                       const at::Tensor& mask_, const at::Tensor& weight_,
                       const c10::optional<at::Tensor>& bias_,
                       int64_t stride_h, int64_t stride_w, int64_t pad_h,
                       int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  check_inputs(input_, offset_, mask_, weight_, stride_h, stride_w, pad_h,
               pad_w, dil_h, dil_w, "dcn_forward");
  // Plain tensors: the kernel is below autograd (its caller owns the
  // gradient), and ATen's out= products refuse inputs that need grad.
  const at::Tensor input = input_.detach();
  const at::Tensor offset = offset_.detach().contiguous();
  const at::Tensor mask = mask_.detach().contiguous();
  const at::Tensor weight = weight_.detach();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->detach().contiguous();
    TORCH_CHECK(bias.device().is_cpu() &&
                    bias.scalar_type() == input.scalar_type() &&
                    bias.dim() == 1 && bias.size(0) == weight.size(0),
                "dcn_forward: bias must be a CPU (C_out,) = (",
                weight.size(0), ",) tensor of the input's dtype, got ",
                bias.sizes(), " ", bias.scalar_type());
  }
  const Geometry g = make_geometry(input, weight, stride_h, stride_w, pad_h,
                                   pad_w, dil_h, dil_w);
  if (g.batch * g.out_channels * g.out_pixels == 0 || g.in_channels == 0) {
    at::Tensor output = at::zeros(
        {g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
    if (bias.defined()) output += bias.view({1, -1, 1, 1});
    return output;
  }
  // Every element is written by its tile's GEMM.
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  const at::Tensor input_cl = channels_last_rows(input);
  const at::Tensor wmat = weight_matrix(weight);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward", [&] {
    forward_tiles<scalar_t>(
        g, input_cl.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
        mask.data_ptr<scalar_t>(), wmat,
        bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, output);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dcn_backward(
    const at::Tensor& grad_out_, const at::Tensor& input_,
    const at::Tensor& offset_, const at::Tensor& mask_,
    const at::Tensor& weight_, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  check_inputs(input_, offset_, mask_, weight_, stride_h, stride_w, pad_h,
               pad_w, dil_h, dil_w, "dcn_backward");
  const at::Tensor input = input_.detach();
  const at::Tensor offset = offset_.detach().contiguous();
  const at::Tensor mask = mask_.detach().contiguous();
  const at::Tensor weight = weight_.detach();
  const Geometry g = make_geometry(input, weight, stride_h, stride_w, pad_h,
                                   pad_w, dil_h, dil_w);
  TORCH_CHECK(grad_out_.device().is_cpu() &&
                  grad_out_.scalar_type() == input.scalar_type(),
              "dcn_backward: grad_out must be a CPU tensor of the input's "
              "dtype (", input.scalar_type(), "), got ",
              grad_out_.scalar_type(), " on ", grad_out_.device());
  TORCH_CHECK(grad_out_.dim() == 4 && grad_out_.size(0) == g.batch &&
                  grad_out_.size(1) == g.out_channels &&
                  grad_out_.size(2) == g.out_h && grad_out_.size(3) == g.out_w,
              "dcn_backward: grad_out must be (N, C_out, H_out, W_out) = (",
              g.batch, ", ", g.out_channels, ", ", g.out_h, ", ", g.out_w,
              "), got ", grad_out_.sizes());
  const at::Tensor grad_out = grad_out_.detach().contiguous();
  if (grad_out.numel() == 0 || g.in_channels == 0) {
    return {at::zeros_like(input, at::MemoryFormat::Contiguous),
            at::zeros_like(offset), at::zeros_like(mask),
            at::zeros_like(weight, at::MemoryFormat::Contiguous)};
  }
  // Each is written whole below: grad_input by the reduction, the offset
  // and mask gradients tap by tap, grad_weight by the final copy.
  at::Tensor grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = at::empty_like(mask);
  at::Tensor grad_weight =
      at::empty_like(weight, at::MemoryFormat::Contiguous);
  const at::Tensor input_cl = channels_last_rows(input);
  const at::Tensor wmat = weight_matrix(weight);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_backward", [&] {
    const Bands bands = make_bands(g, input.element_size());
    std::vector<WorkerGrads<scalar_t>> grads(num_workers(g));
    backward_tiles<scalar_t>(g, bands, input_cl.data_ptr<scalar_t>(),
                             offset.data_ptr<scalar_t>(),
                             mask.data_ptr<scalar_t>(), wmat, grad_out,
                             grad_offset.data_ptr<scalar_t>(),
                             grad_mask.data_ptr<scalar_t>(), grads);
    reduce_grad_input<scalar_t>(g, bands, grads,
                                grad_input.data_ptr<scalar_t>());
    at::Tensor gw = grads[0].grad_weight;
    for (size_t w = 1; w < grads.size(); ++w) gw.add_(grads[w].grad_weight);
    grad_weight.copy_(gw.view({g.out_channels, g.kernel_h, g.kernel_w,
                               g.in_channels})
                          .permute({0, 3, 1, 2}));
  });
  return {grad_input, grad_offset, grad_mask, grad_weight};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "mmdet_dyhead's compiled CPU kernel of the modulated deformable "
      "convolution (DCNv2, groups=1, deform_groups=1, float32/float64).";
  m.def("dcn_forward", &dcn_forward,
        "DCNv2 forward: (input, offset, mask, weight, bias or None, "
        "stride_h, stride_w, pad_h, pad_w, dil_h, dil_w) -> output",
        py::arg("input"), py::arg("offset"), py::arg("mask"),
        py::arg("weight"), py::arg("bias"), py::arg("stride_h"),
        py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"),
        py::arg("dil_h"), py::arg("dil_w"));
  m.def("dcn_backward", &dcn_backward,
        "DCNv2 backward: (grad_out, input, offset, mask, weight, stride_h, "
        "stride_w, pad_h, pad_w, dil_h, dil_w) -> (grad_input, grad_offset, "
        "grad_mask, grad_weight)",
        py::arg("grad_out"), py::arg("input"), py::arg("offset"),
        py::arg("mask"), py::arg("weight"), py::arg("stride_h"),
        py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"),
        py::arg("dil_h"), py::arg("dil_w"));
}
