// Fused multi-head attention for XLA:CPU, forward and backward, as two XLA FFI custom calls.
// The source builds twice: with -DVLM_ATTENTION_BF16 (AVX512_BF16: bf16 matmul operands, f32
// accumulation) and without it (AVX2 + FMA: f32 matmuls). The softmax is f32 in both.
//
// Why it exists: XLA:CPU runs attention's many small batched matmuls (e.g. 96 products of
// 197 x 64 x 197 for ViT-Ti at batch 32) at a quarter of its 2-D matmul rate, and writes the
// logits, the probabilities and two head-split copies to memory in between. Here each (image,
// head) pair is one task: its logits, softmax and weighted values stay in the core's cache.
//
// Layouts: q [B, Tq, H, D], k and v [B, Tk, H, D] (the projections' own layout, so no head-split
// copies), float32 or bfloat16; out like q; lse [B, H, Tq] float32, the softmax's log-normaliser,
// saved by the forward so that the backward recomputes the probabilities (flash-attention style)
// instead of storing them. Numerics of the bf16 build follow `precision.bf16_dot_general`: every
// matmul operand is rounded to bf16, products accumulate in f32, the softmax and its gradient are
// f32. The f32 build computes everything in f32.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_micro.h"
#include "cpu_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using u16 = uint16_t;
using u32 = uint32_t;

// ---------------------------------------------------------------------------------------------
// Scalar bf16 rounding (to nearest even, NaN stays NaN) for the outputs; packing uses vectors below.

inline u32 bf16_bits(float f) {
  u32 u;
  std::memcpy(&u, &f, 4);
  u32 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return ((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r;
}
inline void store(float* p, float x) { *p = x; }
inline void store(u16* p, float x) { *p = u16(bf16_bits(x)); }

// Row i of the logits sees keys [0, len): all of them, or up to itself under the causal mask.
inline int keys_seen(int i, int tk, bool causal) { return causal ? std::min(i + 1, tk) : tk; }

// Per-thread scratch, reused across tasks and calls.
struct Scratch {
  std::vector<u32> a, b, tmp;
  std::vector<float> s, t, c;
  template <typename V>
  static typename V::value_type* get(V& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};
thread_local Scratch scratch;

#if defined(VLM_ATTENTION_BF16)
// =============================================================================================
// bf16 build: AVX512_BF16 matmuls.

// ---------------------------------------------------------------------------------------------
// Packing. A matmul C[M, N] = A[M, K] B[K, N] runs on bf16 pairs along K: A is packed as
// [Mp][K2] u32 (two consecutive k of one row), B as column panels of width 32 (16 for the last
// one), each [K2][W] u32 (the same two k of one column). K2 = ceil(K / 2), Np = roundup(N, 16),
// Mp = max(M, MR); padding is zero, so it adds nothing to the products.

constexpr int MR = 12;  // rows per micro-kernel call: 12 x 2 zmm accumulators

inline int round16(int n) { return (n + 15) / 16 * 16; }
inline int panel_width(int n0, int np) { return np - n0 >= 32 ? 32 : 16; }

struct Gemm {
  int m, n, k, mp, np, k2;
  Gemm(int m_, int n_, int k_) : m(m_), n(n_), k(k_), mp(std::max(m_, MR)), np(round16(n_)), k2((k_ + 1) / 2) {}
};

// 16 values (lanes past `m` zero) rounded to bf16: AVX512_BF16's converter, or a plain load.
inline __m256i bf16x16(const float* p, __mmask16 m) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p));
}
inline __m256i bf16x16(const u16* p, __mmask16 m) { return _mm256_maskz_loadu_epi16(m, p); }

inline __mmask16 first_lanes(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// dst[j] (bf16) = src[j] for j < n.
template <typename T>
inline void row_to_bf16(const T* src, int n, u16* dst) {
  for (int j = 0; j < n; j += 16) {
    __mmask16 m = first_lanes(n - j);
    _mm256_mask_storeu_epi16(dst + j, m, bf16x16(src + j, m));
  }
}

// dst[j] (u32) = bf16(r0[j]) | bf16(r1[j]) << 16 for j < n; r1 may be null (zero).
template <typename T>
inline void interleave_rows(const T* r0, const T* r1, int n, u32* dst) {
  for (int j = 0; j < n; j += 16) {
    __mmask16 m = first_lanes(n - j);
    __m512i lo = _mm512_cvtepu16_epi32(bf16x16(r0 + j, m));
    __m512i hi = r1 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16(r1 + j, m)), 16) : _mm512_setzero_si512();
    _mm512_mask_storeu_epi32(dst + j, m, _mm512_or_si512(lo, hi));
  }
}

// A[i][kk] = src[i * ld + kk]
template <typename T>
void pack_a(const T* src, long ld, const Gemm& g, u32* dst) {
  for (int i = 0; i < g.mp; ++i) {
    u32* d = dst + long(i) * g.k2;
    if (i < g.m) {
      d[g.k2 - 1] = 0;  // the pad half of an odd k
      row_to_bf16(src + i * ld, g.k, reinterpret_cast<u16*>(d));
    } else {
      std::memset(d, 0, sizeof(u32) * g.k2);
    }
  }
}

// A[i][kk] = src[kk * ld + i]  (A is the transpose of a row-major source): the rows' pairs are
// interleaved into `tmp` [K2][M], then transposed.
template <typename T>
void pack_a_t(const T* src, long ld, const Gemm& g, u32* dst, u32* tmp) {
  for (int kp = 0; kp < g.k2; ++kp) {
    const T* r0 = src + long(2 * kp) * ld;
    interleave_rows(r0, 2 * kp + 1 < g.k ? r0 + ld : nullptr, g.m, tmp + long(kp) * g.m);
  }
  for (int i = 0; i < g.m; ++i)
    for (int kp = 0; kp < g.k2; ++kp) dst[long(i) * g.k2 + kp] = tmp[long(kp) * g.m + i];
  std::memset(dst + long(g.m) * g.k2, 0, sizeof(u32) * long(g.mp - g.m) * g.k2);
}

// B[kk][j] = src[kk * ld + j]
template <typename T>
void pack_b(const T* src, long ld, const Gemm& g, u32* dst) {
  for (int n0 = 0; n0 < g.np; n0 += panel_width(n0, g.np)) {
    int w = panel_width(n0, g.np);
    u32* panel = dst + long(n0) * g.k2;
    int valid = std::max(0, std::min(w, g.n - n0));
    for (int kp = 0; kp < g.k2; ++kp) {
      u32* d = panel + long(kp) * w;
      const T* r0 = src + long(2 * kp) * ld + n0;
      interleave_rows(r0, 2 * kp + 1 < g.k ? r0 + ld : nullptr, valid, d);
      for (int j = valid; j < w; ++j) d[j] = 0;
    }
  }
}

// B[kk][j] = src[j * ld + kk]  (B is the transpose of a row-major source): each source row is
// rounded into `tmp` [N][K2] (its pairs along kk are then whole u32s), which is transposed.
template <typename T>
void pack_b_t(const T* src, long ld, const Gemm& g, u32* dst, u32* tmp) {
  for (int j = 0; j < g.n; ++j) {
    tmp[long(j) * g.k2 + g.k2 - 1] = 0;
    row_to_bf16(src + long(j) * ld, g.k, reinterpret_cast<u16*>(tmp + long(j) * g.k2));
  }
  for (int n0 = 0; n0 < g.np; n0 += panel_width(n0, g.np)) {
    int w = panel_width(n0, g.np);
    u32* panel = dst + long(n0) * g.k2;
    for (int kp = 0; kp < g.k2; ++kp)
      for (int j = 0; j < w; ++j) panel[long(kp) * w + j] = n0 + j < g.n ? tmp[long(n0 + j) * g.k2 + kp] : 0u;
  }
}

// ---------------------------------------------------------------------------------------------
// C[Mp][Np] (f32, row stride ldc) = A B, on full MR-row blocks; the last block is shifted up to
// end at row max(M, MR), so rows are never partial (some are computed twice, identically).

template <int NV>
inline void micro(const u32* a, int k2, const u32* b, float* c, int ldc) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int kp = 0; kp < k2; ++kp) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + long(kp) * 16 * NV + 16 * v);
    for (int r = 0; r < MR; ++r) {
      __m512bh av = (__m512bh)_mm512_set1_epi32(int(a[long(r) * k2 + kp]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + long(r) * ldc + 16 * v, acc[r][v]);
}

void gemm(const Gemm& g, const u32* a, const u32* b, float* c) {
  for (int n0 = 0; n0 < g.np; n0 += panel_width(n0, g.np)) {
    int w = panel_width(n0, g.np);
    const u32* panel = b + long(n0) * g.k2;
    for (int m0 = 0; m0 < g.mp; m0 += MR) {
      int ms = std::min(m0, g.mp - MR);
      if (w == 32)
        micro<2>(a + long(ms) * g.k2, g.k2, panel, c + long(ms) * g.np + n0, g.np);
      else
        micro<1>(a + long(ms) * g.k2, g.k2, panel, c + long(ms) * g.np + n0, g.np);
    }
  }
}

// C = op(A) op(B) for a Gemm g: A [m, k] is read from `a` (row stride lda) or, when `a_t`, is the
// transpose of a [k, m] source; likewise B [k, n] from `b`. `b_wide`: b's rows may be read up to
// np columns (the f32 build's in-place panels use it). Here both operands are packed to bf16.
template <typename TA, typename TB>
void product(const Gemm& g, const TA* a, long lda, bool a_t, const TB* b, long ldb, bool b_t, bool b_wide,
             float* c) {
  (void)b_wide;
  Scratch& sc = scratch;
  u32* tmp = Scratch::get(sc.tmp, size_t(std::max(g.m, g.n) + 1) * (g.k2 + 1));
  u32* pa = Scratch::get(sc.a, size_t(g.mp) * g.k2);
  u32* pb = Scratch::get(sc.b, size_t(g.np) * g.k2);
  if (a_t) pack_a_t(a, lda, g, pa, tmp); else pack_a(a, lda, g, pa);
  if (b_t) pack_b_t(b, ldb, g, pb, tmp); else pack_b(b, ldb, g, pb);
  gemm(g, pa, pb, c);
}

// ---------------------------------------------------------------------------------------------
// exp on 16 floats: 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2, degree-6 polynomial (~1 ulp).

inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-103.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lanes [j0, j0 + 16) that are below `len`.
inline __mmask16 lanes_below(int j0, int len) {
  int n = len - j0;
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// s (the raw logits of one row) -> probabilities in place (zero past `len`); returns the row's lse.
inline float softmax_row(float* s, int np, int len, float scale) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < np; j += 16) {
    __mmask16 m = lanes_below(j, len);
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(scale));
    mx = _mm512_mask_max_ps(mx, m, mx, x);
  }
  float row_max = _mm512_reduce_max_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < np; j += 16) {
    __mmask16 m = lanes_below(j, len);
    __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(scale), _mm512_set1_ps(row_max));
    __m512 e = _mm512_maskz_mov_ps(m, exp16(x));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(s + j, e);
  }
  float total = _mm512_reduce_add_ps(sum);
  __m512 inv = _mm512_set1_ps(1.0f / total);
  for (int j = 0; j < np; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inv));
  return row_max + std::log(total);
}

// s (raw logits) -> probabilities exp(s * scale - lse), zero past `len`.
inline void probs_row(float* s, int np, int len, float scale, float lse) {
  for (int j = 0; j < np; j += 16) {
    __mmask16 m = lanes_below(j, len);
    __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(scale), _mm512_set1_ps(lse));
    _mm512_storeu_ps(s + j, _mm512_maskz_mov_ps(m, exp16(x)));
  }
}

// dp (one row, in place) -> ds = p (dp - rowsum(p dp)) * scale.
inline void softmax_grad_row(const float* pr, float* dr, int np, float scale) {
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < np; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(pr + j), _mm512_loadu_ps(dr + j), acc);
  __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
  __m512 sv = _mm512_set1_ps(scale);
  for (int j = 0; j < np; j += 16) {
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(pr + j), _mm512_sub_ps(_mm512_loadu_ps(dr + j), delta));
    _mm512_storeu_ps(dr + j, _mm512_mul_ps(x, sv));  // p is zero past the keys seen, so is ds
  }
}

#else
// =============================================================================================
// f32 build: float32 matmuls with AVX2 + FMA (any x86-64 CPU of the last decade). The same
// structure as above: A packed as [Mp][K] rows, B as column panels of width 16, each [K][16],
// Np = roundup(N, 16), Mp = max(M, MR), zero padding; the packed f32 values sit in the u32
// buffers the drivers share with the bf16 build (K2 = K here: one value per packed unit).

constexpr int MR = 6;  // rows per micro-kernel call: 6 x 2 ymm accumulators

inline int round16(int n) { return (n + 15) / 16 * 16; }

struct Gemm {
  int m, n, k, mp, np, k2;
  Gemm(int m_, int n_, int k_) : m(m_), n(n_), k(k_), mp(std::max(m_, MR)), np(round16(n_)), k2(k_) {}
};

inline float to_f32(float x) { return x; }
inline float to_f32(u16 x) {
  u32 u = u32(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float* floats(u32* p) { return reinterpret_cast<float*>(p); }
inline const float* floats(const u32* p) { return reinterpret_cast<const float*>(p); }

// A[i][kk] = src[i * ld + kk]
template <typename T>
void pack_a(const T* src, long ld, const Gemm& g, u32* dst) {
  float* d = floats(dst);
  for (int i = 0; i < g.m; ++i)
    for (int kk = 0; kk < g.k; ++kk) d[long(i) * g.k + kk] = to_f32(src[i * ld + kk]);
  std::memset(d + long(g.m) * g.k, 0, sizeof(float) * long(g.mp - g.m) * g.k);
}

// A[i][kk] = src[kk * ld + i]  (A is the transpose of a row-major source)
template <typename T>
void pack_a_t(const T* src, long ld, const Gemm& g, u32* dst, u32*) {
  float* d = floats(dst);
  for (int kk = 0; kk < g.k; ++kk)
    for (int i = 0; i < g.m; ++i) d[long(i) * g.k + kk] = to_f32(src[kk * ld + i]);
  std::memset(d + long(g.m) * g.k, 0, sizeof(float) * long(g.mp - g.m) * g.k);
}

// B[kk][j] = src[kk * ld + j]
template <typename T>
void pack_b(const T* src, long ld, const Gemm& g, u32* dst) {
  for (int n0 = 0; n0 < g.np; n0 += 16) {
    float* panel = floats(dst) + long(n0) * g.k;
    int valid = std::min(16, g.n - n0);
    for (int kk = 0; kk < g.k; ++kk) {
      const T* r = src + kk * ld + n0;
      float* d = panel + long(kk) * 16;
      for (int j = 0; j < 16; ++j) d[j] = j < valid ? to_f32(r[j]) : 0.0f;
    }
  }
}

// B[kk][j] = src[j * ld + kk]  (B is the transpose of a row-major source)
template <typename T>
void pack_b_t(const T* src, long ld, const Gemm& g, u32* dst, u32*) {
  for (int n0 = 0; n0 < g.np; n0 += 16) {
    float* panel = floats(dst) + long(n0) * g.k;
    for (int j = 0; j < 16; ++j) {
      const T* r = src + long(n0 + j) * ld;
      if (n0 + j < g.n)
        for (int kk = 0; kk < g.k; ++kk) panel[long(kk) * 16 + j] = to_f32(r[kk]);
      else
        for (int kk = 0; kk < g.k; ++kk) panel[long(kk) * 16 + j] = 0.0f;
    }
  }
}

// A B with A's rows at a (row stride lda) and B's 16-column panels either packed (at b + n0 * k,
// row stride 16) or in place in a row-major B (at b + n0, row stride ldb).
void gemm(const Gemm& g, const float* a, long lda, const float* b, long ldb, bool packed_b, float* c) {
  for (int n0 = 0; n0 < g.np; n0 += 16) {
    const float* panel = packed_b ? b + long(n0) * g.k : b + n0;
    for (int m0 = 0; m0 < g.mp; m0 += MR) {
      int ms = std::min(m0, g.mp - MR);
      // rows ms..ms+5, the last block shifted up to end at row Mp (see above)
      vlm_jax::micro_6x16<1>(a + ms * lda, lda, panel, packed_b ? 16 : ldb, g.k, c + long(ms) * g.np + n0, g.np,
                             false);
    }
  }
}

// C = op(A) op(B), as in the bf16 build. f32 operands are read in place where they can be: A's rows
// when A is not transposed and has at least MR rows (so no block is shifted past its end), B's
// panels when B is not transposed and its rows can be read to np columns (`b_wide`: a scratch
// row of np floats, or n a multiple of 16). Packing the rest costs a copy per call; in place, the
// forward on ViT-Ti's shapes skips copying q and the probabilities.
template <typename TA, typename TB>
void product(const Gemm& g, const TA* a, long lda, bool a_t, const TB* b, long ldb, bool b_t, bool b_wide,
             float* c) {
  Scratch& sc = scratch;
  const float* pa = nullptr;
  const float* pb = nullptr;
  if constexpr (std::is_same<TA, float>::value)
    if (!a_t && g.m >= MR) pa = a;
  if constexpr (std::is_same<TB, float>::value)
    if (!b_t && (b_wide || g.n % 16 == 0)) pb = b;
  if (!pa) {
    u32* buf = Scratch::get(sc.a, size_t(g.mp) * g.k2);
    if (a_t) pack_a_t(a, lda, g, buf, nullptr); else pack_a(a, lda, g, buf);
    pa = floats(buf);
    lda = g.k;
  }
  const bool packed_b = pb == nullptr;
  if (packed_b) {
    u32* buf = Scratch::get(sc.b, size_t(g.np) * g.k2);
    if (b_t) pack_b_t(b, ldb, g, buf, nullptr); else pack_b(b, ldb, g, buf);
    pb = floats(buf);
  }
  gemm(g, pa, lda, pb, ldb, packed_b, c);
}

// exp on 8 floats, as exp16 above; 2^n is built in the exponent bits, so x is clamped to
// [-87, 88] (results below e^-87 are not flushed to zero; the softmax masks what must be zero).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lanes [j0, j0 + 8) that are below `len` (all bits set) or not (zero).
inline __m256 lanes_below(int j0, int len) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(len - j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline float hsum8(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// s (the raw logits of one row) -> probabilities in place (zero past `len`); returns the row's lse.
inline float softmax_row(float* s, int np, int len, float scale) {
  const __m256 sv = _mm256_set1_ps(scale), neg = _mm256_set1_ps(-INFINITY);
  __m256 mx = neg;
  for (int j = 0; j < np; j += 8)
    mx = _mm256_max_ps(mx, _mm256_blendv_ps(neg, _mm256_mul_ps(_mm256_loadu_ps(s + j), sv), lanes_below(j, len)));
  const float row_max = hmax8(mx);
  const __m256 mv = _mm256_set1_ps(row_max);
  __m256 sum = _mm256_setzero_ps();
  for (int j = 0; j < np; j += 8) {
    __m256 e = _mm256_and_ps(exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), sv, mv)), lanes_below(j, len));
    sum = _mm256_add_ps(sum, e);
    _mm256_storeu_ps(s + j, e);
  }
  const float total = hsum8(sum);
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int j = 0; j < np; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
  return row_max + std::log(total);
}

// s (raw logits) -> probabilities exp(s * scale - lse), zero past `len`.
inline void probs_row(float* s, int np, int len, float scale, float lse) {
  const __m256 sv = _mm256_set1_ps(scale), lv = _mm256_set1_ps(lse);
  for (int j = 0; j < np; j += 8)
    _mm256_storeu_ps(s + j, _mm256_and_ps(exp8(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), sv, lv)), lanes_below(j, len)));
}

// dp (one row, in place) -> ds = p (dp - rowsum(p dp)) * scale.
inline void softmax_grad_row(const float* pr, float* dr, int np, float scale) {
  __m256 acc = _mm256_setzero_ps();
  for (int j = 0; j < np; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(pr + j), _mm256_loadu_ps(dr + j), acc);
  const __m256 delta = _mm256_set1_ps(hsum8(acc)), sv = _mm256_set1_ps(scale);
  for (int j = 0; j < np; j += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(pr + j), _mm256_sub_ps(_mm256_loadu_ps(dr + j), delta));
    _mm256_storeu_ps(dr + j, _mm256_mul_ps(x, sv));  // p is zero past the keys seen, so is ds
  }
}
#endif

struct Dims {
  int b, tq, tk, h, d;
};

Dims dims_of(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k) {
  auto dq = q.dimensions();
  auto dk = k.dimensions();
  return Dims{int(dq[0]), int(dq[1]), int(dk[1]), int(dq[2]), int(dq[3])};
}

// ---------------------------------------------------------------------------------------------
// Forward: out = softmax(q k^T * scale [causal]) v, lse = the softmax's log-normaliser.

template <typename T>
void forward(const Dims& dm, const T* q, const T* k, const T* v, T* out, float* lse, float scale,
             bool causal, ffi::ThreadPool& pool) {
  const long ld = long(dm.h) * dm.d;
  vlm_jax::run_tasks(pool, dm.b * dm.h, [&](int task) {
    int bi = task / dm.h, hi = task % dm.h;
    const T* qb = q + long(bi) * dm.tq * ld + long(hi) * dm.d;
    const T* kb = k + long(bi) * dm.tk * ld + long(hi) * dm.d;
    const T* vb = v + long(bi) * dm.tk * ld + long(hi) * dm.d;
    Scratch& sc = scratch;
    Gemm g1(dm.tq, dm.tk, dm.d);  // logits = q k^T
    float* s = Scratch::get(sc.s, size_t(g1.mp) * g1.np);
    product(g1, qb, ld, false, kb, ld, true, false, s);
    float* lrow = lse + long(task) * dm.tq;
    for (int i = 0; i < dm.tq; ++i) lrow[i] = softmax_row(s + long(i) * g1.np, g1.np, keys_seen(i, dm.tk, causal), scale);
    Gemm g2(dm.tq, dm.d, dm.tk);  // out = p v
    float* c = Scratch::get(sc.c, size_t(g2.mp) * g2.np);
    product(g2, static_cast<const float*>(s), g1.np, false, vb, ld, false, false, c);
    T* ob = out + long(bi) * dm.tq * ld + long(hi) * dm.d;
    for (int i = 0; i < dm.tq; ++i)
      for (int j = 0; j < dm.d; ++j) store(ob + i * ld + j, c[long(i) * g2.np + j]);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward, given the forward's lse and the cotangent `dout`:
//   p = exp(q k^T * scale - lse), dp = dout v^T, ds = p (dp - rowsum(p dp)) * scale,
//   dq = ds k, dk = ds^T q (computed as (q^T ds)^T), dv = p^T dout (as (dout^T p)^T).

template <typename T>
void backward(const Dims& dm, const T* q, const T* k, const T* v, const float* lse, const T* dout, T* dq,
              T* dk, T* dv, float scale, bool causal, ffi::ThreadPool& pool) {
  const long ld = long(dm.h) * dm.d;
  vlm_jax::run_tasks(pool, dm.b * dm.h, [&](int task) {
    int bi = task / dm.h, hi = task % dm.h;
    long qoff = long(bi) * dm.tq * ld + long(hi) * dm.d, koff = long(bi) * dm.tk * ld + long(hi) * dm.d;
    const T *qb = q + qoff, *kb = k + koff, *vb = v + koff, *gb = dout + qoff;
    Scratch& sc = scratch;
    Gemm gs(dm.tq, dm.tk, dm.d);  // logits and dp: [tq, tk], contraction over d
    const int np = gs.np;
    float* p = Scratch::get(sc.s, size_t(gs.mp) * np);
    float* ds = Scratch::get(sc.t, size_t(gs.mp) * np);
    product(gs, qb, ld, false, kb, ld, true, false, p);
    const float* lrow = lse + long(task) * dm.tq;
    for (int i = 0; i < dm.tq; ++i) probs_row(p + long(i) * np, np, keys_seen(i, dm.tk, causal), scale, lrow[i]);
    product(gs, gb, ld, false, vb, ld, true, false, ds);  // dp
    for (int i = 0; i < dm.tq; ++i) softmax_grad_row(p + long(i) * np, ds + long(i) * np, np, scale);
    // dq = ds k: [tq, d], contraction over tk.
    Gemm gq(dm.tq, dm.d, dm.tk);
    float* c = Scratch::get(sc.c, size_t(gq.mp) * gq.np);
    product(gq, static_cast<const float*>(ds), np, false, kb, ld, false, false, c);
    T* dqb = dq + qoff;
    for (int i = 0; i < dm.tq; ++i)
      for (int j = 0; j < dm.d; ++j) store(dqb + i * ld + j, c[long(i) * gq.np + j]);
    // dk^T = q^T ds and dv^T = dout^T p: [d, tk], contraction over tq.
    Gemm gk(dm.d, dm.tk, dm.tq);
    c = Scratch::get(sc.c, size_t(gk.mp) * gk.np);
    T* dkb = dk + koff;
    T* dvb = dv + koff;
    for (int which = 0; which < 2; ++which) {
      // ds and p are scratch rows of np floats (zero past the keys), so B's panels read in place.
      product(gk, which == 0 ? qb : gb, ld, true, static_cast<const float*>(which == 0 ? ds : p), np, false, true, c);
      T* dst = which == 0 ? dkb : dvb;
      for (int j = 0; j < dm.tk; ++j)
        for (int e = 0; e < dm.d; ++e) store(dst + j * ld + e, c[long(e) * gk.np + j]);
    }
  });
}

ffi::Error check(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v) {
  if (q.dimensions().size() != 4 || k.dimensions().size() != 4 || v.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("cpu_attention: q, k, v must be [batch, length, heads, head_dim]");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("cpu_attention: q, k, v must share one dtype");
  if (q.element_type() != ffi::DataType::F32 && q.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("cpu_attention: dtype must be float32 or bfloat16");
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale,
                   int32_t causal) {
  if (auto err = check(q, k, v); err.failure()) return err;
  Dims dm = dims_of(q, k);
  if (q.element_type() == ffi::DataType::F32)
    forward(dm, q.typed_data<float>(), k.typed_data<float>(), v.typed_data<float>(), out->typed_data<float>(),
            lse->typed_data(), scale, causal != 0, pool);
  else
    forward(dm, reinterpret_cast<const u16*>(q.untyped_data()), reinterpret_cast<const u16*>(k.untyped_data()),
            reinterpret_cast<const u16*>(v.untyped_data()), reinterpret_cast<u16*>(out->untyped_data()),
            lse->typed_data(), scale, causal != 0, pool);
  return ffi::Error::Success();
}

ffi::Error BwdImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                   ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, float scale, int32_t causal) {
  if (auto err = check(q, k, v); err.failure()) return err;
  Dims dm = dims_of(q, k);
  if (q.element_type() == ffi::DataType::F32)
    backward(dm, q.typed_data<float>(), k.typed_data<float>(), v.typed_data<float>(), lse.typed_data(),
             dout.typed_data<float>(), dq->typed_data<float>(), dk->typed_data<float>(), dv->typed_data<float>(),
             scale, causal != 0, pool);
  else {
    auto in = [](const ffi::AnyBuffer& x) { return reinterpret_cast<const u16*>(x.untyped_data()); };
    auto res = [](ffi::Result<ffi::AnyBuffer>& x) { return reinterpret_cast<u16*>(x->untyped_data()); };
    backward(dm, in(q), in(k), in(v), lse.typed_data(), in(dout), res(dq), res(dk), res(dv), scale, causal != 0,
             pool);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmAttentionFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmAttentionBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal"));
