"""The MLP on the CPU matmul kernel with GELU folded into its products (`models.cpu_mlp`): GELU and
its derivative within 2e-7 of float64 over [-12, 12]; the output and all five gradients equal
float64 numpy for shapes off the kernel's 6 x 16 tiles and 8-float epilogue vectors;
`layers.Mlp` keeps nn.Dense's parameters (same values at init), matches XLA's path and steps aside
for the tanh GELU, dropout in training, bf16 and multi-device meshes. Skipped where this CPU cannot
run the kernel.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import cpu_mlp
from vlm_jax.models.layers import Mlp

needs_kernel = pytest.mark.skipif(cpu_mlp.unavailable() is not None, reason=str(cpu_mlp.unavailable()))
TARGETS = ("vlm_jax_matmul_bias_gelu_f32", "vlm_jax_matmul_gelu_grad_f32")


def _cdf(h):
  return 0.5 * np.vectorize(math.erfc)(-h / math.sqrt(2.0))


@needs_kernel
def test_gelu_and_its_derivative_match_float64():
  # A 1 x 1 product of weight 1: h = x, so the kernels return gelu(x) and gelu'(x) themselves.
  h = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4]]).astype(np.float32)
  one = jnp.ones((1, 1), jnp.float32)
  got_h, gelu = cpu_mlp._bias_gelu(jnp.asarray(h)[:, None], one, jnp.zeros((1,), jnp.float32))
  grad = cpu_mlp._gelu_grad(jnp.ones((h.size, 1), jnp.float32), one, jnp.asarray(h)[:, None])
  h64 = h.astype(np.float64)
  np.testing.assert_array_equal(np.asarray(got_h)[:, 0], h)
  want_gelu = h64 * _cdf(h64)
  want_grad = _cdf(h64) + h64 * np.exp(-h64 ** 2 / 2) / math.sqrt(2 * math.pi)
  assert np.abs(np.asarray(gelu)[:, 0] - want_gelu).max() <= 2e-7 * 12
  assert (np.abs(np.asarray(gelu)[:, 0] - want_gelu) <= 2e-7 * np.maximum(np.abs(h64), 1e-30)).all()
  assert np.abs(np.asarray(grad)[:, 0] - want_grad).max() <= 2e-7
  assert np.asarray(gelu)[-6:-4, 0].tolist() == [0.0, 0.0]


def _float64(x, w1, b1, w2, b2, dy):
  x, w1, b1, w2, b2, dy = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2, dy))
  h = x @ w1 + b1
  cdf = _cdf(h)
  a = h * cdf
  dh = (dy @ w2.T) * (cdf + h * np.exp(-h ** 2 / 2) / math.sqrt(2 * math.pi))
  return a @ w2 + b2, (dh @ w1.T, x.T @ dh, dh.sum(0), a.T @ dy, dy.sum(0))


@needs_kernel
# (20, 4200, 40): fc1's product and the GELU-gradient product take the split-k path, epilogue after the sum.
@pytest.mark.parametrize("m,d,hidden", [(1, 1, 1), (7, 5, 13), (37, 24, 50), (301, 64, 264), (1000, 192, 768),
                                        (20, 4200, 40)])
def test_output_and_gradients_match_float64(m, d, hidden):
  rng = np.random.default_rng(m + d + hidden)
  x = rng.standard_normal((m, d)).astype(np.float32)
  w1 = (rng.standard_normal((d, hidden)) * 3 / math.sqrt(d)).astype(np.float32)  # pre-activations to about +-10
  b1, b2 = rng.standard_normal(hidden).astype(np.float32), rng.standard_normal(d).astype(np.float32)
  w2 = (rng.standard_normal((hidden, d)) / math.sqrt(hidden)).astype(np.float32)
  dy = rng.standard_normal((m, d)).astype(np.float32)
  y, vjp = jax.vjp(cpu_mlp.mlp, *(jnp.asarray(a) for a in (x, w1, b1, w2, b2)))
  want_y, want_grads = _float64(x, w1, b1, w2, b2, dy)
  for got, want in ((y, want_y), *zip(vjp(jnp.asarray(dy)), want_grads)):
    scale = np.abs(want).max() + 1e-12
    assert np.abs(np.asarray(got, np.float64) - want).max() <= 2e-6 * scale


def _run(mlp, x, params=None):
  params = params or jax.jit(mlp.init)(jax.random.PRNGKey(0), x)
  fn = jax.jit(jax.value_and_grad(lambda p: jnp.sum(mlp.apply(p, x, rngs={"dropout": jax.random.PRNGKey(1)},
                                                              deterministic=False) ** 2)))
  hlo = fn.lower(params).as_text()
  return params, fn(params), all(t in hlo for t in TARGETS)


@needs_kernel
def test_mlp_module_picks_the_fused_path_with_nn_dense_parameters():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 11, 24)), jnp.float32)
  p_xla, (l_xla, g_xla), fused_xla = _run(Mlp(40, matmul="xla"), x)
  p_k, (l_k, g_k), fused_k = _run(Mlp(40, matmul="auto"), x)
  assert fused_k and not fused_xla
  assert jax.tree.structure(p_k) == jax.tree.structure(p_xla)
  for a, b in zip(jax.tree.leaves(p_k), jax.tree.leaves(p_xla)):
    np.testing.assert_array_equal(a, b)  # the same parameters, drawn the same way
  np.testing.assert_allclose(l_k, l_xla, rtol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_xla))
  for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  # The same parameters are also an nn.Dense's.
  dense = nn.Dense(40)
  np.testing.assert_array_equal(
      dense.apply({"params": nn.meta.unbox(p_k)["params"]["fc1"]}, x), x @ p_k["params"]["fc1"]["kernel"].value
      + p_k["params"]["fc1"]["bias"].value)


@needs_kernel
@pytest.mark.parametrize("kw", [dict(gelu_approximate=True), dict(dropout=0.1), dict(dtype=jnp.bfloat16),
                                dict(dtype_mm=jnp.bfloat16)])
def test_mlp_module_keeps_xla_where_the_fused_path_does_not_apply(kw):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 16)), jnp.float32)
  assert not _run(Mlp(32, **kw), x)[2]


@needs_kernel
def test_mlp_module_keeps_xla_under_a_multi_device_mesh():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5, 16)), jnp.float32)
  with jax.set_mesh(jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])):
    assert not _run(Mlp(32), x)[2]
