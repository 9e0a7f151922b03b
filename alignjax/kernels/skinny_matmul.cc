// Skinny float32 matrix product for XLA:CPU, an XLA FFI custom call (see skinny_matmul.py).
//
//   y[m, n] = sum_k x[m, k] w[k, n]      x [M, K], w [K, N], y [M, N], row-major, M small (eq. 1)
//
// A decode step multiplies a few rows (the batch) by every weight matrix once, so its products
// are bound by reading w from memory. This kernel reads w from memory once and never copies
// (packs) it:
//   - rows of x are taken 8 at a time (a pass), transposed to xt [K, 8] so that the 8 values
//     multiplying one row of w are one 32-byte line; all passes use a block of w while it is
//     in cache, so w is read from memory once for any number of rows;
//   - w is read in blocks of kRowBlock rows; within a block, columns advance in strips of 8
//     (one AVX2 register), so each of the block's rows is streamed contiguously, with a
//     software prefetch kPrefetch floats ahead;
//   - the 8 x 8 partial sums of a strip live in 8 AVX2 registers (8 x 16 would need all 16
//     and spill) and are accumulated into y from one row block to the next;
//   - columns are split between the threads of XLA's intra-op pool; the calling thread works
//     too and claims parts from a shared counter, so it never waits for a part no thread has
//     started.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 8;          // rows of x per pass
constexpr int64_t kStrip = 8;         // columns of w per strip (one AVX2 register)
constexpr int64_t kRowBlock = 8;      // rows of w streamed side by side
constexpr int64_t kPrefetch = 64;     // floats ahead in each streamed row of w
constexpr int64_t kMinStripsPerPart = 16;  // 128 columns: the least work worth a thread

// One 8 x 8 tile of a pass: y[0:rows, c:c+8] (+)= xt[k0:k0+kb] . w[k0:k0+kb, c:c+8] (written,
// not added to, when k0 = 0). The 8 partial sums take 8 of AVX2's 16 registers, with room
// for the weights and the broadcast. kFull: all 8 columns exist, else only the lanes in mask.
template <bool kFull>
inline void Tile(const float* xt, const float* w, float* y, int64_t rows, int64_t n, int64_t c,
                 int64_t k0, int64_t kb, __m256i mask) {
  __m256 acc[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    if (k0 == 0 || r >= rows) {
      acc[r] = _mm256_setzero_ps();
    } else {
      acc[r] = kFull ? _mm256_loadu_ps(y + r * n + c) : _mm256_maskload_ps(y + r * n + c, mask);
    }
  }
  const float* wp = w + k0 * n + c;
  const float* xk = xt + k0 * kRows;
  for (int64_t i = 0; i < kb; ++i, wp += n, xk += kRows) {
    _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch), _MM_HINT_T0);
    const __m256 wv = kFull ? _mm256_loadu_ps(wp) : _mm256_maskload_ps(wp, mask);
    for (int64_t r = 0; r < kRows; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xk + r), wv, acc[r]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (kFull) {
      _mm256_storeu_ps(y + r * n + c, acc[r]);
    } else {
      _mm256_maskstore_ps(y + r * n + c, mask, acc[r]);
    }
  }
}

// Columns of strips [strip_begin, strip_end) of y = x . w, for every pass of 8 rows (xt holds
// the passes' transposes, [passes, K, 8]). The last strip may be partial (n % 8 columns).
void Columns(const float* xt, const float* w, float* y, int64_t m, int64_t k, int64_t n,
             int64_t strip_begin, int64_t strip_end) {
  const int64_t passes = (m + kRows - 1) / kRows;
  const int64_t full_end = std::min(strip_end, n / kStrip);
  alignas(32) int32_t lanes[kStrip];
  for (int64_t i = 0; i < kStrip; ++i) lanes[i] = i < n % kStrip ? -1 : 0;
  const __m256i tail = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  for (int64_t k0 = 0; k0 < k; k0 += kRowBlock) {  // all passes use the block while cached
    const int64_t kb = std::min(kRowBlock, k - k0);
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t rows = std::min(kRows, m - p * kRows);
      const float* xp = xt + p * k * kRows;
      float* yp = y + p * kRows * n;
      for (int64_t s = strip_begin; s < full_end; ++s) {
        Tile<true>(xp, w, yp, rows, n, s * kStrip, k0, kb, tail);
      }
      if (full_end < strip_end) Tile<false>(xp, w, yp, rows, n, full_end * kStrip, k0, kb, tail);
    }
  }
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error SkinnyMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("skinny_matmul: x, w and y must be matrices");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  if (wd[0] != k || yd[0] != m || yd[1] != n) {
    return ffi::Error::InvalidArgument(
        "skinny_matmul: shapes must be x [M, K], w [K, N], y [M, N]");
  }
  float* out = y->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(out, out + m * n, 0.0f);
    return ffi::Error::Success();
  }

  // xt[p] = rows [8p, 8p + 8) of x, transposed to [K, 8], missing rows zero.
  const int64_t passes = (m + kRows - 1) / kRows;
  std::vector<float> xt(passes * k * kRows, 0.0f);
  const float* xs = x.typed_data();
  for (int64_t r = 0; r < m; ++r) {
    float* dst = xt.data() + (r / kRows) * k * kRows + r % kRows;
    for (int64_t i = 0; i < k; ++i) dst[i * kRows] = xs[r * k + i];
  }

  const float* ws = w.typed_data();
  const int64_t strips = (n + kStrip - 1) / kStrip;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t parts = std::clamp<int64_t>(strips / kMinStripsPerPart, 1, threads);
  const float* xt_data = xt.data();
  auto run_part = [=](int64_t part) {
    Columns(xt_data, ws, out, m, k, n, part * strips / parts, (part + 1) * strips / parts);
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, run_part, parts] {
    for (int64_t part; (part = progress->next.fetch_add(1)) < parts;) {
      run_part(part);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([work] { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < parts) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignjaxSkinnyMatmulF32, SkinnyMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int AlignjaxSkinnyMatmulCpuSupported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
