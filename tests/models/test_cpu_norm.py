"""The CPU LayerNorm kernel (`models.cpu_norm`): output and gradients equal float64 numpy for rows
off its 8-float vectors and 64-row blocks; `layers.LayerNorm` keeps nn.LayerNorm's parameters and
steps aside for XLA on bf16 and under a multi-device mesh; `matmul` picks it in the models; an
impossible 'cpu_fused' is a clear error. Skipped where this CPU cannot run it.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from vlm_jax.models import cpu_norm, layers
from vlm_jax.models.vit import ViT

TARGET = "vlm_jax_layer_norm"
needs_kernel = pytest.mark.skipif(cpu_norm.unavailable() is not None, reason=str(cpu_norm.unavailable()))


def _float64(x, scale, bias, g, eps):
  """y and the gradients of sum(y * g), by hand in float64."""
  x, scale, bias, g = (np.asarray(a, np.float64) for a in (x, scale, bias, g))
  mean = x.mean(-1, keepdims=True)
  rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  xhat = (x - mean) * rstd
  gs = g * scale
  dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return xhat * scale + bias, dx, (g * xhat).sum(rows), g.sum(rows)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (130, 8), (2, 65, 64), (4, 50, 192)])
def test_output_and_gradients_match_float64(shape):
  rng = np.random.default_rng(sum(shape))
  # A large shared offset: the kernel's two-pass variance must not lose it.
  x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32)
  d = shape[-1]
  scale, bias = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  fn = jax.jit(lambda x, s, b, g: jax.vjp(lambda *a: cpu_norm.layer_norm(*a, 1e-6), x, s, b))
  y, vjp = fn(x, scale, bias, g)
  want = _float64(x, scale, bias, g, 1e-6)
  got = (y, *vjp(g))
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * max(1.0, float(np.abs(b).max())), err_msg=name)


@needs_kernel
def test_module_keeps_flax_parameters_and_matches_it():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 24)), jnp.float32)
  ours = layers.LayerNorm(epsilon=1e-6, kernel=True)
  flax_ln = nn.LayerNorm(epsilon=1e-6)
  p = ours.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, flax_ln.init(jax.random.PRNGKey(0), x))
  p = jax.tree.map(lambda a: a + jnp.linspace(-1, 1, a.size).reshape(a.shape), p)
  assert TARGET in jax.jit(ours.apply).lower(p, x).as_text()
  loss = lambda m: jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1)))(p, x)
  (v1, g1), (v2, g2) = loss(ours), loss(flax_ln)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_bf16_and_multi_device_mesh_use_xla():
  ln = layers.LayerNorm(epsilon=1e-6, kernel=True)
  x = jnp.ones((8, 4, 16), jnp.float32)
  p = ln.init(jax.random.PRNGKey(0), x)
  bf16 = layers.LayerNorm(epsilon=1e-6, kernel=True, dtype=jnp.bfloat16)
  assert TARGET not in jax.jit(bf16.apply).lower(p, x.astype(jnp.bfloat16)).as_text()
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
  with jax.set_mesh(mesh):
    assert TARGET not in jax.jit(ln.apply).lower(p, x).as_text()


def test_matmul_setting_picks_the_kernel_for_every_layer_norm(monkeypatch):
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)

  def calls(matmul):
    vit = ViT(num_classes=0, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, pool="map", matmul=matmul,
              scan_layers=False)
    params = jax.eval_shape(vit.init, jax.random.PRNGKey(0), x)
    return jax.jit(jax.grad(lambda p: jnp.sum(vit.apply(p, x)[0]))).lower(params).as_text().count(TARGET)
  assert calls("xla") == 0
  if cpu_norm.unavailable() is None:
    # ln1 and ln2 of two layers, the final norm and the MAP head's: 6 forward and 6 backward calls.
    assert calls("cpu_fused") == 12
  monkeypatch.setattr(cpu_norm, "unavailable", lambda: "the CPU LayerNorm kernel needs a CPU with AVX2")
  with pytest.raises(ValueError, match="needs a CPU with AVX2 \\(model.matmul='cpu_fused' for the LayerNorms; set "
                                       "it to 'auto' or 'xla'\\)"):
    calls("cpu_fused")
  assert calls("auto") == 0
