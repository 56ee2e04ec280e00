// Dense f32 matmul for XLA:CPU (AVX2 + FMA) as an XLA FFI custom call: C[M, N] = op(A) op(B), where
// op transposes a row-major operand when asked, so a layer's forward (x W), input gradient
// (dy W^T) and weight gradient (x^T dy) each run as one call without a transposed copy.
//
// Why it exists: in a CPU train step XLA:CPU ran the projections' dots (6304 x 192 x 576 for
// ViT-Ti's q/k/v at batch 32) at 54-104 GFLOP/s on a 2-core AVX2 machine, and autodiff's transposed
// operands cost copies. Alone, this kernel and XLA's dot both reach 110-150 on those shapes; in the
// step the kernel is about 4% faster (BENCHMARKS.md, session 8). It is a GotoBLAS-style blocked
// product: B is packed once per call into 16-column panels of KC rows (a panel stays in L1), each
// task packs an MC x KC block of A (in L2) into 6-row micro-panels, and a 6 x 16 micro-kernel keeps
// its tile of C in 12 ymm registers.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

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

// The MR x NR tile at c (row stride ldc) = (its old value if `add`) + a b over kc, where a is one
// packed micro-panel of A and b one packed panel of B.
// The 12 accumulators are named variables, not an array: GCC keeps an array of __m256 on the stack
// and stores it back on every step of the k loop, which halves the kernel's speed.
void micro(const float* a, const float* b, int kc, float* c, long ldc, bool add) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kc; ++k, a += MR, b += NR) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 av = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  const __m256 rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r) {
    __m256 lo = rows[r][0], hi = rows[r][1];
    if (add) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(c + r * ldc));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(c + r * ldc + 8));
    }
    _mm256_storeu_ps(c + r * ldc, lo);
    _mm256_storeu_ps(c + r * ldc + 8, hi);
  }
}

// micro() on a tile of which only `rows` x `cols` lie inside C: through a full-size copy.
void micro_edge(const float* a, const float* b, int kc, float* c, long ldc, int rows, int cols, bool add) {
  float tile[MR * NR] = {};
  if (add)
    for (int r = 0; r < rows; ++r) std::memcpy(tile + r * NR, c + r * ldc, sizeof(float) * cols);
  micro(a, b, kc, tile, NR, add);
  for (int r = 0; r < rows; ++r) std::memcpy(c + r * ldc, tile + r * NR, sizeof(float) * cols);
}

struct Scratch {
  std::vector<float> a, b;
};
thread_local Scratch scratch;

inline long round_up(long x, long m) { return (x + m - 1) / m * m; }

// C[m, n] = op(A) op(B) with reduction length k. B is packed once (tasks over its KC chunks);
// then tasks over blocks of mc rows x nc columns of C pack their rows of A per chunk and run the
// micro-kernel over them, the B panel in the inner loop (so it stays in L1 across the block's rows).
void matmul(const Operand& a, const Operand& b, float* c, long m, long n, long k, ffi::ThreadPool& pool) {
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
    for (int ch = 0; ch < chunks; ++ch) {
      long k0 = long(ch) * KC;
      int kc = int(std::min<long>(KC, k - k0));
      pack_a(a, i0, rows, k0, kc, ap.data());
      for (long j = j0; j < j1; j += NR) {
        const float* panel = bpacked + k0 * np + j * kc;
        int cols = int(std::min<long>(NR, n - j));
        for (int p = 0; p < rows; p += MR) {
          const float* apanel = ap.data() + long(p) * kc;
          float* tile = c + (i0 + p) * n + j;
          if (rows - p >= MR && cols == NR)
            micro(apanel, panel, kc, tile, n, ch > 0);
          else
            micro_edge(apanel, panel, kc, tile, n, std::min(MR, rows - p), cols, ch > 0);
        }
      }
    }
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
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(c->typed_data(), 0, sizeof(float) * m * n);
    return ffi::Error::Success();
  }
  Operand oa{a.typed_data(), long(da[1]), trans_a != 0}, ob{b.typed_data(), long(db[1]), trans_b != 0};
  matmul(oa, ob, c->typed_data(), m, n, k, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmMatmulF32, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("trans_a")
                                  .Attr<int32_t>("trans_b"));
