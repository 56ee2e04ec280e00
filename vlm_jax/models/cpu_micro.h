// The 6 x 16 f32 FMA micro-kernel shared by the CPU kernels (cpu_matmul.cc, the f32 build of
// cpu_attention.cc): C[6][16] (row stride ldc) = (its old value if `add`) + A B over kc steps,
// with A's row r, step k at a[r * rs + k * KS] (KS = 1: rows of a row-major A read in place;
// KS = 6, rs = 1: a packed micro-panel) and row k of B's 16-column panel at b + k * ldb.
// The 12 accumulators are named variables, not an array: GCC keeps an array of __m256 on the stack
// and stores it back on every step of the k loop, which halves the kernel's speed.
#pragma once

#include <immintrin.h>

namespace vlm_jax {

template <int KS>
inline void micro_6x16(const float* a, long rs, const float* b, long ldb, int kc, float* c, long ldc, bool add) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + rs, *a2 = a + 2 * rs, *a3 = a + 3 * rs, *a4 = a + 4 * rs, *a5 = a + 5 * rs;
  for (int k = 0; k < kc; ++k, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 av = _mm256_broadcast_ss(a0 + k * KS);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a1 + k * KS);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a2 + k * KS);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a3 + k * KS);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a4 + k * KS);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a5 + k * KS);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  const __m256 rows[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < 6; ++r) {
    __m256 lo = rows[r][0], hi = rows[r][1];
    if (add) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(c + r * ldc));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(c + r * ldc + 8));
    }
    _mm256_storeu_ps(c + r * ldc, lo);
    _mm256_storeu_ps(c + r * ldc + 8, hi);
  }
}

}  // namespace vlm_jax
