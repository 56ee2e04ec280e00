// Dense f32 matmul for XLA:CPU (AVX2 + FMA) as an XLA FFI custom call: C[M, N] = op(A) op(B), where
// op transposes a row-major operand when asked, so a layer's forward (x W), input gradient
// (dy W^T) and weight gradient (x^T dy) each run as one call without a transposed copy.
//
// Why it exists: in a CPU train step XLA:CPU ran the projections' dots (6304 x 192 x 576 for
// ViT-Ti's q/k/v at batch 32) at 54-104 GFLOP/s on a 2-core AVX2 machine, and autodiff's transposed
// operands cost copies. Alone, this kernel and XLA's dot both reach 110-150 on those shapes; in the
// step the kernel is about 4% faster (BENCHMARKS.md, session 8). It is a GotoBLAS-style blocked
// product: B is packed once per call into 16-column panels of KC rows (a panel stays in L1), each
// task takes an MC x KC block of A (in L2) in 6-row micro-panels (read in place from a row-major A,
// packed from a transposed one), and a 6 x 16 micro-kernel keeps its tile of C in 12 ymm registers. Weight gradients (x^T dy: a small C, the tokens as the
// reduction) split the reduction instead (`matmul_split_k`): 104-126 -> 120-162 GFLOP/s on
// ViT-Ti's, +7% on its train step (BENCHMARKS.md, session 11).
//
// Two more targets run a transformer MLP's GELU inside the product, on each block of C while it is
// still in cache, instead of in separate passes over the [tokens, hidden] activations:
//   VlmMatmulBiasGeluF32: h = x W + b and a = gelu(h) (both returned: a feeds fc2, h the backward);
//   VlmMatmulGeluGradF32: dh = (dy W2^T) * gelu'(h).
// GELU is the exact one, x Phi(x); Phi comes from erfc in the form t P(t) exp(-z^2) of Abramowitz
// and Stegun 7.1.26 (absolute error 1.4e-7, so gelu(h) is within 7e-8 |h| of exact, below the
// rounding of h itself), and gelu'(h) = Phi(h) + h phi(h) reuses the same exp.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_micro.h"
#include "cpu_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int MR = 6;    // rows of the micro-kernel's C tile
constexpr int NR = 16;   // its columns: two ymm registers
constexpr int KC = 256;  // reduction chunk: a packed B panel (KC x NR floats, 16 KiB) fits in L1

// A row-major 2-D operand, read as op(X)(r, c) = X[r, c], or X[c, r] when transposed.
struct Operand {
  const float* p;
  long ld;  // row stride of the stored array
  bool t;
};

// op(A) rows [i0, i0 + rows), reduction [k0, k0 + kc) -> micro-panels [rows / MR][kc][MR], zero
// padded to a multiple of MR rows.
void pack_a(const Operand& a, long i0, int rows, long k0, int kc, float* dst) {
  for (int p = 0; p < rows; p += MR) {
    float* d = dst + long(p) * kc;
    int valid = std::min(MR, rows - p);
    if (a.t) {  // op(A)(i, k) = A[k, i]: MR consecutive floats of one stored row per k
      for (int k = 0; k < kc; ++k) {
        const float* s = a.p + (k0 + k) * a.ld + i0 + p;
        for (int r = 0; r < MR; ++r) d[k * MR + r] = r < valid ? s[r] : 0.0f;
      }
    } else {
      for (int r = 0; r < MR; ++r) {
        if (r < valid) {
          const float* s = a.p + (i0 + p + r) * a.ld + k0;
          for (int k = 0; k < kc; ++k) d[k * MR + r] = s[k];
        } else {
          for (int k = 0; k < kc; ++k) d[k * MR + r] = 0.0f;
        }
      }
    }
  }
}

// op(B) reduction [k0, k0 + kc), columns [0, n) -> panels [np / NR][kc][NR], zero padded to np.
void pack_b(const Operand& b, long k0, int kc, long n, float* dst) {
  for (long j0 = 0; j0 < n; j0 += NR) {
    float* d = dst + j0 * kc;
    int valid = int(std::min<long>(NR, n - j0));
    if (!b.t && valid == NR) {
      for (int k = 0; k < kc; ++k) {
        const float* s = b.p + (k0 + k) * b.ld + j0;
        _mm256_storeu_ps(d + k * NR, _mm256_loadu_ps(s));
        _mm256_storeu_ps(d + k * NR + 8, _mm256_loadu_ps(s + 8));
      }
    } else if (!b.t) {
      for (int k = 0; k < kc; ++k)
        for (int c = 0; c < NR; ++c) d[k * NR + c] = c < valid ? b.p[(k0 + k) * b.ld + j0 + c] : 0.0f;
    } else {  // op(B)(k, j) = B[j, k]: walk each stored row along k
      for (int c = 0; c < NR; ++c) {
        if (c < valid) {
          const float* s = b.p + (j0 + c) * b.ld + k0;
          for (int k = 0; k < kc; ++k) d[k * NR + c] = s[k];
        } else {
          for (int k = 0; k < kc; ++k) d[k * NR + c] = 0.0f;
        }
      }
    }
  }
}

// The MR x NR tile at c (row stride ldc) = (its old value if `add`) + a b over kc: one micro-panel
// of A (packed, KS = MR and rs = 1, or six rows of a row-major A read in place, KS = 1 and rs its
// row stride) times one packed panel of B (cpu_micro.h).
template <int KS>
void micro(const float* a, long rs, const float* b, int kc, float* c, long ldc, bool add) {
  vlm_jax::micro_6x16<KS>(a, rs, b, NR, kc, c, ldc, add);
}

// micro() on a tile of which only `rows` x `cols` lie inside C: through a full-size copy.
template <int KS>
void micro_edge(const float* a, long rs, const float* b, int kc, float* c, long ldc, int rows, int cols, bool add) {
  float tile[MR * NR] = {};
  if (add)
    for (int r = 0; r < rows; ++r) std::memcpy(tile + r * NR, c + r * ldc, sizeof(float) * cols);
  micro<KS>(a, rs, b, kc, tile, NR, add);
  for (int r = 0; r < rows; ++r) std::memcpy(c + r * ldc, tile + r * NR, sizeof(float) * cols);
}

// e^x for x in [-88, 0], 8 at once: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2
// is exact to float precision), e^r by its Taylor series to degree 7 (error below 1e-8), and 2^n
// built in the exponent bits.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068202862268e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// Phi(h) (the standard normal CDF) and phi(h) (its density) for 8 values of h.
inline void normal_cdf_pdf(__m256 h, __m256* cdf, __m256* pdf) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // z = |h| / sqrt(2), capped where erfc(z) is below float's smallest normal anyway (and exp's
  // range holds)
  const __m256 z = _mm256_min_ps(_mm256_mul_ps(_mm256_andnot_ps(sign, h), _mm256_set1_ps(0.70710678118654752f)),
                                 _mm256_set1_ps(9.0f));
  const __m256 e = exp_nonpositive(_mm256_xor_ps(_mm256_mul_ps(z, z), sign));  // exp(-z^2) = exp(-h^2 / 2)
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), z, _mm256_set1_ps(1.0f)));
  __m256 q = _mm256_set1_ps(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(c));
  const __m256 tail = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(q, t), e), _mm256_set1_ps(0.5f));  // Phi(-|h|)
  const __m256 negative = _mm256_cmp_ps(h, _mm256_setzero_ps(), _CMP_LT_OQ);
  *cdf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), tail), tail, negative);
  *pdf = _mm256_mul_ps(e, _mm256_set1_ps(0.39894228040143268f));
}

// What a product does to its block of C once the block is complete.
struct Epilogue {
  enum Kind { kNone, kBiasGelu, kGeluGrad } kind = kNone;
  const float* bias = nullptr;  // kBiasGelu: [n], added to C, which then holds h
  float* act = nullptr;         // kBiasGelu: [m, n], receives gelu(h)
  const float* h = nullptr;     // kGeluGrad: [m, n], C *= gelu'(h)
};

// Eight columns of one row of C at `c` (`act`, `h` at the same offset); `cols` < 8 go through a
// full-width copy so the tail gets exactly the same arithmetic.
inline void epilogue8(const Epilogue& e, float* c, long off, const float* bias, int cols) {
  float cb[8] = {}, hb[8] = {}, bb[8] = {}, ab[8];
  const bool full = cols == 8;
  if (!full) {
    std::memcpy(cb, c + off, sizeof(float) * cols);
    if (e.kind == Epilogue::kGeluGrad) std::memcpy(hb, e.h + off, sizeof(float) * cols);
    if (e.kind == Epilogue::kBiasGelu) std::memcpy(bb, bias, sizeof(float) * cols);
  }
  __m256 v = _mm256_loadu_ps(full ? c + off : cb), cdf, pdf;
  if (e.kind == Epilogue::kBiasGelu) {
    v = _mm256_add_ps(v, _mm256_loadu_ps(full ? bias : bb));
    normal_cdf_pdf(v, &cdf, &pdf);
    const __m256 a = _mm256_mul_ps(v, cdf);
    _mm256_storeu_ps(full ? e.act + off : ab, a);
    if (!full) std::memcpy(e.act + off, ab, sizeof(float) * cols);
  } else {
    const __m256 h = _mm256_loadu_ps(full ? e.h + off : hb);
    normal_cdf_pdf(h, &cdf, &pdf);
    v = _mm256_mul_ps(v, _mm256_fmadd_ps(h, pdf, cdf));
  }
  _mm256_storeu_ps(full ? c + off : cb, v);
  if (!full) std::memcpy(c + off, cb, sizeof(float) * cols);
}

void apply_epilogue(const Epilogue& e, float* c, long n, long i0, int rows, long j0, long j1) {
  for (long i = i0; i < i0 + rows; ++i)
    for (long j = j0; j < j1; j += 8)
      epilogue8(e, c, i * n + j, e.bias ? e.bias + j : nullptr, int(std::min<long>(8, j1 - j)));
}

struct Scratch {
  std::vector<float> a, b;
};
thread_local Scratch scratch;

inline long round_up(long x, long m) { return (x + m - 1) / m * m; }

constexpr int SLICES = 8;  // reduction slices of a split-k product (a constant: results must not depend
                           // on the thread count)

// Split-k, for a small C and a long reduction (a weight gradient x^T dy: C is [in, out], k the
// tokens). The blocked path below would pack all of B (k x n) up front and then stream it once per
// row block of C; here each task takes one slice of the reduction, packs its chunks of A and B
// while they are used (so each input is read from memory once), and accumulates into its own
// partial C. The partials are then summed in slice order, each row block by one task.
void matmul_split_k(const Operand& a, const Operand& b, float* c, long m, long n, long k, ffi::ThreadPool& pool,
                    const Epilogue& epilogue) {
  const long np = round_up(n, NR), mp = round_up(m, MR);
  const long chunks = (k + KC - 1) / KC;
  const int slices = int(std::min<long>(SLICES, chunks));
  const long per_slice = (chunks + slices - 1) / slices;
  const long nc = std::min<long>(np, 128);  // columns of B packed at a time: KC x nc floats (128 KiB) in L2
  std::vector<float> partial(size_t(slices - 1) * m * n);  // slice 0 accumulates in C itself
  vlm_jax::run_tasks(pool, slices, [&](int s) {
    float* out = s == 0 ? c : partial.data() + size_t(s - 1) * m * n;
    Scratch& buf = scratch;
    if (buf.a.size() < size_t(mp * KC)) buf.a.resize(mp * KC);
    if (buf.b.size() < size_t(nc * KC)) buf.b.resize(nc * KC);
    const long ch0 = s * per_slice, ch1 = std::min(chunks, ch0 + per_slice);
    if (ch0 >= ch1) {
      std::memset(out, 0, sizeof(float) * m * n);
      return;
    }
    for (long ch = ch0; ch < ch1; ++ch) {
      const long k0 = ch * KC;
      const int kc = int(std::min<long>(KC, k - k0));
      pack_a(a, 0, int(m), k0, kc, buf.a.data());
      for (long j0 = 0; j0 < n; j0 += nc) {
        const long cols_here = std::min(nc, n - j0);
        Operand bj{b.t ? b.p + j0 * b.ld : b.p + j0, b.ld, b.t};
        pack_b(bj, k0, kc, cols_here, buf.b.data());
        for (long j = 0; j < cols_here; j += NR) {
          const float* panel = buf.b.data() + j * kc;
          const int cols = int(std::min<long>(NR, cols_here - j));
          for (long p = 0; p < m; p += MR) {
            float* tile = out + p * n + j0 + j;
            if (m - p >= MR && cols == NR)
              micro<MR>(buf.a.data() + p * kc, 1, panel, kc, tile, n, ch > ch0);
            else
              micro_edge<MR>(buf.a.data() + p * kc, 1, panel, kc, tile, n, int(std::min<long>(MR, m - p)), cols,
                             ch > ch0);
          }
        }
      }
    }
  });
  const long rows_per_task = std::max<long>(8, (m + 4 * SLICES - 1) / (4 * SLICES));
  const int tasks = int((m + rows_per_task - 1) / rows_per_task);
  vlm_jax::run_tasks(pool, tasks, [&](int t) {
    const long i0 = t * rows_per_task, rows = std::min(rows_per_task, m - i0);
    float* dst = c + i0 * n;
    for (int s = 1; s < slices; ++s) {
      const float* src = partial.data() + size_t(s - 1) * m * n + i0 * n;
      long e = 0;
      for (; e + 8 <= rows * n; e += 8)
        _mm256_storeu_ps(dst + e, _mm256_add_ps(_mm256_loadu_ps(dst + e), _mm256_loadu_ps(src + e)));
      for (; e < rows * n; ++e) dst[e] += src[e];
    }
    if (epilogue.kind != Epilogue::kNone) apply_epilogue(epilogue, c, n, i0, int(rows), 0, n);
  });
}

// C[m, n] = op(A) op(B) with reduction length k. B is packed once (tasks over its KC chunks);
// then tasks over blocks of mc rows x nc columns of C take their rows of A per chunk (in place, or
// packed when A is transposed) and run the micro-kernel over them, the B panel in the inner loop (so it stays in L1 across the block's rows).
void matmul(const Operand& a, const Operand& b, float* c, long m, long n, long k, ffi::ThreadPool& pool,
            const Epilogue& epilogue = {}) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = 0, then the epilogue
    std::memset(c, 0, sizeof(float) * m * n);
    if (epilogue.kind != Epilogue::kNone) apply_epilogue(epilogue, c, n, 0, int(m), 0, n);
    return;
  }
  if (m <= 1024 && n <= 1024 && k >= 4 * std::max(m, n) && k >= 2L * SLICES * KC) {
    matmul_split_k(a, b, c, m, n, k, pool, epilogue);
    return;
  }
  const long np = round_up(n, NR);
  const int chunks = int((k + KC - 1) / KC);
  // Packed B: contiguous panels (reading a row-major B in place, as strided panels, measured slower).
  std::vector<float>& bp = scratch.b;  // the caller's buffer: concurrent calls run on other threads
  bp.resize(size_t(np) * k);
  float* bpacked = bp.data();
  vlm_jax::run_tasks(pool, chunks, [&](int ch) {
    long k0 = long(ch) * KC;
    pack_b(b, k0, int(std::min<long>(KC, k - k0)), n, bpacked + k0 * np);
  });
  // Blocks small enough that every thread gets several, large enough to reuse each packed panel.
  const int threads = std::max(1, int(pool.num_threads()));
  long mc = std::min<long>(96, std::max<long>(24, round_up((m + 4 * threads - 1) / (4 * threads), MR)));
  long nc = np;
  long row_blocks = (m + mc - 1) / mc;
  if (row_blocks < 4 * threads) nc = std::max<long>(64, round_up((np * row_blocks + 4 * threads - 1) / (4 * threads), NR));
  nc = std::min(nc, np);
  long col_blocks = (np + nc - 1) / nc;
  vlm_jax::run_tasks(pool, int(row_blocks * col_blocks), [&](int task) {
    long i0 = (task / col_blocks) * mc, j0 = (task % col_blocks) * nc;
    int rows = int(std::min(mc, m - i0));
    long j1 = std::min(j0 + nc, n);
    std::vector<float>& ap = scratch.a;
    if (ap.size() < size_t(round_up(mc, MR) * KC)) ap.resize(round_up(mc, MR) * KC);
    // A row-major A's whole 6-row micro-panels are read in place (packing them cost ~8% of a
    // product with 192 output columns); a transposed A, and a block's last partial micro-panel, are packed.
    const int in_place = a.t ? 0 : rows / MR * MR;
    for (int ch = 0; ch < chunks; ++ch) {
      long k0 = long(ch) * KC;
      int kc = int(std::min<long>(KC, k - k0));
      if (rows > in_place) pack_a(a, i0 + in_place, rows - in_place, k0, kc, ap.data());
      for (long j = j0; j < j1; j += NR) {
        const float* panel = bpacked + k0 * np + j * kc;
        int cols = int(std::min<long>(NR, n - j));
        for (int p = 0; p < rows; p += MR) {
          float* tile = c + (i0 + p) * n + j;
          if (p < in_place) {
            const float* arows = a.p + (i0 + p) * a.ld + k0;
            if (cols == NR)
              micro<1>(arows, a.ld, panel, kc, tile, n, ch > 0);
            else
              micro_edge<1>(arows, a.ld, panel, kc, tile, n, MR, cols, ch > 0);
            continue;
          }
          const float* apanel = ap.data() + long(p - in_place) * kc;
          if (rows - p >= MR && cols == NR)
            micro<MR>(apanel, 1, panel, kc, tile, n, ch > 0);
          else
            micro_edge<MR>(apanel, 1, panel, kc, tile, n, std::min(MR, rows - p), cols, ch > 0);
        }
      }
    }
    if (epilogue.kind != Epilogue::kNone) apply_epilogue(epilogue, c, n, i0, rows, j0, j1);
  });
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> c, int32_t trans_a, int32_t trans_b) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("cpu_matmul: operands and result must be 2-D");
  long m = trans_a ? da[1] : da[0], k = trans_a ? da[0] : da[1];
  long kb = trans_b ? db[1] : db[0], n = trans_b ? db[0] : db[1];
  if (k != kb || dc[0] != m || dc[1] != n)
    return ffi::Error::InvalidArgument("cpu_matmul: operand shapes do not match");
  Operand oa{a.typed_data(), long(da[1]), trans_a != 0}, ob{b.typed_data(), long(db[1]), trans_b != 0};
  matmul(oa, ob, c->typed_data(), m, n, k, pool);
  return ffi::Error::Success();
}

// x [m, k] @ w [k, n] + bias [n] -> h [m, n] and gelu(h) [m, n].
ffi::Error BiasGeluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> act) {
  auto dx = x.dimensions(), dw = w.dimensions();
  if (dx.size() != 2 || dw.size() != 2 || dx[1] != dw[0] || bias.dimensions().size() != 1 ||
      bias.dimensions()[0] != dw[1])
    return ffi::Error::InvalidArgument("cpu_matmul: bias_gelu expects x [m, k], w [k, n], bias [n]");
  long m = dx[0], k = dx[1], n = dw[1];
  Epilogue e;
  e.kind = Epilogue::kBiasGelu;
  e.bias = bias.typed_data();
  e.act = act->typed_data();
  matmul(Operand{x.typed_data(), k, false}, Operand{w.typed_data(), n, false}, h->typed_data(), m, n, k, pool, e);
  return ffi::Error::Success();
}

// (dy [m, k] @ w2 [n, k]^T) * gelu'(h [m, n]) -> dh [m, n].
ffi::Error GeluGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w2,
                        ffi::Buffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> dh) {
  auto dd = dy.dimensions(), dw = w2.dimensions(), dhh = h.dimensions();
  if (dd.size() != 2 || dw.size() != 2 || dhh.size() != 2 || dd[1] != dw[1] || dhh[0] != dd[0] || dhh[1] != dw[0])
    return ffi::Error::InvalidArgument("cpu_matmul: gelu_grad expects dy [m, k], w2 [n, k], h [m, n]");
  long m = dd[0], k = dd[1], n = dw[0];
  Epilogue e;
  e.kind = Epilogue::kGeluGrad;
  e.h = h.typed_data();
  matmul(Operand{dy.typed_data(), k, false}, Operand{w2.typed_data(), k, true}, dh->typed_data(), m, n, k, pool, e);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmMatmulBiasGeluF32, BiasGeluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmMatmulGeluGradF32, GeluGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmMatmulF32, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));
