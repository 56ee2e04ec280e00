"""`tools/benchmark.py kernels`: GFLOP/s of the hand-written CPU kernels against XLA on each product
of one transformer layer (forward, input gradient and weight gradient of the q/k/v/out, fc1 and fc2
projections on the f32 matmul kernel vs XLA's dot) and of attention (forward, forward + backward on
the f32 attention kernel vs XLA's einsums), best of `repeats` calls each."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def _best(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def bench_kernels(a):
  from vlm_jax.models import cpu_attention, cpu_matmul

  for what, reason in (("matmul", cpu_matmul.unavailable()), ("attention", cpu_attention.unavailable("float32"))):
    if reason:
      raise SystemExit(f"the CPU {what} kernel cannot run here: {reason}")
  m, d, hidden, hd = a.batch * a.tokens, a.width, 4 * a.width, a.width // a.heads
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  rows = []
  # (name, m, k, n, op(a) transposed, op(b) transposed): C = op(a) op(b), a layer's products.
  for name, fin, fout in (("q/k/v/out", d, d), ("fc1", d, hidden), ("fc2", hidden, d)):
    for kind, mm, k, n, ta, tb in (("forward", m, fin, fout, False, False), ("input grad", m, fout, fin, False, True),
                                   ("weight grad", fin, m, fout, True, False)):
      x, y = arr(*((k, mm) if ta else (mm, k))), arr(*((n, k) if tb else (k, n)))
      kernel = jax.jit(lambda x, y, ta=ta, tb=tb: cpu_matmul.matmul(x, y, ta, tb))
      xla = jax.jit(lambda x, y, ta=ta, tb=tb: jnp.dot(x.T if ta else x, y.T if tb else y))
      rows.append(dict(op=f"{name} {kind}", shape=f"{mm}x{k}x{n}", flops=2 * mm * k * n,
                       kernel_s=_best(kernel, (x, y), a.repeats), xla_s=_best(xla, (x, y), a.repeats)))
  q, k, v, g = (arr(a.batch, a.tokens, a.heads, hd) for _ in range(4))
  scale = hd ** -0.5

  def xla_attention(q, k, v):
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)
  ours = lambda q, k, v: cpu_attention.attention(q, k, v, scale, False, "float32")
  fl = 4 * a.batch * a.heads * a.tokens * a.tokens * hd
  for kind, mult, wrap in (("forward", 1, lambda f: f),
                           ("forward + backward", 3, lambda f: jax.grad(lambda q, k, v: (f(q, k, v) * g).sum(),
                                                                        argnums=(0, 1, 2)))):
    rows.append(dict(op=f"attention {kind}", shape=f"{a.batch}x{a.tokens}x{a.heads}x{hd}", flops=mult * fl,
                     kernel_s=_best(jax.jit(wrap(ours)), (q, k, v), a.repeats),
                     xla_s=_best(jax.jit(wrap(xla_attention)), (q, k, v), a.repeats)))
  print(f"{'product':>24} {'shape':>16} {'kernel GFLOP/s':>15} {'XLA GFLOP/s':>12}")
  for r in rows:
    r["kernel_gflops"], r["xla_gflops"] = r["flops"] / r["kernel_s"] / 1e9, r["flops"] / r["xla_s"] / 1e9
    print(f"{r['op']:>24} {r['shape']:>16} {r['kernel_gflops']:>15.1f} {r['xla_gflops']:>12.1f}")
  return {"benchmark": "kernels", "device": jax.devices()[0].device_kind, "threads": a.threads, "rows": rows}
