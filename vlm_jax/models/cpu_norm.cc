// LayerNorm over the last axis for XLA:CPU (AVX2 + FMA), forward and backward, as XLA FFI custom
// calls on f32 rows [N, D].
//
// Why it exists: XLA:CPU runs a LayerNorm and its gradient as several passes, and writes the
// broadcast scale out as a full [N, D] array for the fusions that consume it (YNNPACK fusions take
// no broadcast operand). Here each row is read once into L1 and every pass over it happens there.
//
// Forward: y = (x - mean) * rstd * scale + bias, with the variance from a second pass over the row
// (not E[x^2] - E[x]^2); mean and rstd are returned for the backward.
// Backward: with xhat = (x - mean) * rstd and g = dy * scale,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dscale = sum_rows dy * xhat,  dbias = sum_rows dy.
// The row sums for dscale and dbias are taken per block of rows and added in block order, so the
// result does not depend on the number of threads.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr long kRowsPerTask = 64;

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The sum of a row, and its sum of squared deviations from `mean`.
float row_sum(const float* x, long d) {
  __m256 acc = _mm256_setzero_ps();
  long j = 0;
  for (; j + 8 <= d; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + j));
  float s = hsum(acc);
  for (; j < d; ++j) s += x[j];
  return s;
}

float row_sq_dev(const float* x, long d, float mean) {
  __m256 acc = _mm256_setzero_ps(), m = _mm256_set1_ps(mean);
  long j = 0;
  for (; j + 8 <= d; j += 8) {
    __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + j), m);
    acc = _mm256_fmadd_ps(c, c, acc);
  }
  float s = hsum(acc);
  for (; j < d; ++j) s += (x[j] - mean) * (x[j] - mean);
  return s;
}

void forward_rows(const float* x, const float* scale, const float* bias, float* y, float* mean, float* rstd,
                  long r0, long r1, long d, float eps) {
  for (long r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float mu = row_sum(xr, d) / float(d);
    float rs = 1.0f / std::sqrt(row_sq_dev(xr, d, mu) / float(d) + eps);
    mean[r] = mu;
    rstd[r] = rs;
    __m256 vm = _mm256_set1_ps(mu), vr = _mm256_set1_ps(rs);
    long j = 0;
    for (; j + 8 <= d; j += 8) {
      __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j), vm), vr);
      _mm256_storeu_ps(yr + j, _mm256_fmadd_ps(xh, _mm256_loadu_ps(scale + j), _mm256_loadu_ps(bias + j)));
    }
    for (; j < d; ++j) yr[j] = (xr[j] - mu) * rs * scale[j] + bias[j];
  }
}

// dx for rows [r0, r1); dscale / dbias of those rows added into ds / db (length d each).
void backward_rows(const float* x, const float* scale, const float* mean, const float* rstd, const float* dy,
                   float* dx, float* ds, float* db, long r0, long r1, long d) {
  for (long r = r0; r < r1; ++r) {
    const float *xr = x + r * d, *gr = dy + r * d;
    float* dxr = dx + r * d;
    __m256 vm = _mm256_set1_ps(mean[r]), vr = _mm256_set1_ps(rstd[r]);
    __m256 sg = _mm256_setzero_ps(), sgx = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= d; j += 8) {
      __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j), vm), vr);
      __m256 dyj = _mm256_loadu_ps(gr + j);
      __m256 g = _mm256_mul_ps(dyj, _mm256_loadu_ps(scale + j));
      sg = _mm256_add_ps(sg, g);
      sgx = _mm256_fmadd_ps(g, xh, sgx);
      _mm256_storeu_ps(ds + j, _mm256_fmadd_ps(dyj, xh, _mm256_loadu_ps(ds + j)));
      _mm256_storeu_ps(db + j, _mm256_add_ps(dyj, _mm256_loadu_ps(db + j)));
    }
    float sum_g = hsum(sg), sum_gx = hsum(sgx);
    for (long t = j; t < d; ++t) {
      float xh = (xr[t] - mean[r]) * rstd[r], g = gr[t] * scale[t];
      sum_g += g;
      sum_gx += g * xh;
      ds[t] += gr[t] * xh;
      db[t] += gr[t];
    }
    float mg = sum_g / float(d), mgx = sum_gx / float(d);
    __m256 vmg = _mm256_set1_ps(mg), vmgx = _mm256_set1_ps(mgx);
    for (j = 0; j + 8 <= d; j += 8) {
      __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j), vm), vr);
      __m256 g = _mm256_mul_ps(_mm256_loadu_ps(gr + j), _mm256_loadu_ps(scale + j));
      __m256 t = _mm256_sub_ps(_mm256_sub_ps(g, vmg), _mm256_mul_ps(xh, vmgx));
      _mm256_storeu_ps(dxr + j, _mm256_mul_ps(t, vr));
    }
    for (; j < d; ++j) {
      float xh = (xr[j] - mean[r]) * rstd[r];
      dxr[j] = rstd[r] * (gr[j] * scale[j] - mg - xh * mgx);
    }
  }
}

// The rows of x (any leading shape) and the length of the normalised last axis.
bool rows_of(ffi::Buffer<ffi::F32>& x, long* n, long* d) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return false;
  *d = dims[dims.size() - 1];
  *n = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) *n *= dims[i];
  return true;
}

long tasks_for(long n) { return (n + kRowsPerTask - 1) / kRowsPerTask; }

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  long n, d;
  if (!rows_of(x, &n, &d) || long(scale.element_count()) != d || long(bias.element_count()) != d ||
      long(mean->element_count()) != n || long(rstd->element_count()) != n ||
      y->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("cpu_norm: operand shapes do not match");
  if (n == 0 || d == 0) return ffi::Error::Success();
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  vlm_jax::run_tasks(pool, int(tasks_for(n)), [&](int t) {
    long r0 = t * kRowsPerTask;
    forward_rows(xp, sp, bp, yp, mp, rp, r0, std::min(n, r0 + kRowsPerTask), d, eps);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias) {
  long n, d;
  if (!rows_of(x, &n, &d) || long(scale.element_count()) != d || long(mean.element_count()) != n ||
      long(rstd.element_count()) != n || dy.element_count() != x.element_count() ||
      dx->element_count() != x.element_count() || long(dscale->element_count()) != d ||
      long(dbias->element_count()) != d)
    return ffi::Error::InvalidArgument("cpu_norm: operand shapes do not match");
  float *ds = dscale->typed_data(), *db = dbias->typed_data();
  std::fill(ds, ds + d, 0.0f);
  std::fill(db, db + d, 0.0f);
  if (n == 0 || d == 0) return ffi::Error::Success();
  long tasks = tasks_for(n);
  std::vector<float> partial(size_t(tasks) * 2 * d, 0.0f);  // per block: dscale then dbias
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *mp = mean.typed_data(), *rp = rstd.typed_data(),
              *gp = dy.typed_data();
  float* dxp = dx->typed_data();
  vlm_jax::run_tasks(pool, int(tasks), [&](int t) {
    long r0 = t * kRowsPerTask;
    float* part = partial.data() + size_t(t) * 2 * d;
    backward_rows(xp, sp, mp, rp, gp, dxp, part, part + d, r0, std::min(n, r0 + kRowsPerTask), d);
  });
  for (long t = 0; t < tasks; ++t) {
    const float* part = partial.data() + size_t(t) * 2 * d;
    for (long j = 0; j < d; ++j) {
      ds[j] += part[j];
      db[j] += part[d + j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmLayerNormFwd, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [..., D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean [...]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd [...]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmLayerNormBwd, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean [...]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd [...]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [..., D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx [..., D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale [D]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias [D]
