"""The CPU matmul kernel (`models.cpu_matmul`): products and gradients equal float64 numpy / XLA's
dot for every transpose combination and for sizes off its 6 x 16 tile and 256-long chunk; as a
`dot_general` it takes the projections' dimension numbers and hands the rest to XLA; models pick
it by `matmul` and match XLA; a bad setting is a clear error. Skipped where this CPU cannot run it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.models import cpu_matmul
from vlm_jax.models.precision import dot_general
from vlm_jax.models.text import Decoder
from vlm_jax.models.vit import ViT
from vlm_jax.tasks.common import module_kwargs

TARGET = "vlm_jax_matmul_f32"
needs_kernel = pytest.mark.skipif(cpu_matmul.unavailable() is not None, reason=str(cpu_matmul.unavailable()))


@needs_kernel
# (50, 150, 4700): a small C and a long reduction, the split-k path (8 slices, the last one empty;
# 150 columns = two blocks of packed B).
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 5, 3), (13, 37, 300), (100, 20, 600), (6, 16, 256), (97, 48, 513),
                                   (50, 150, 4700)])
def test_products_and_gradients_match_float64(m, n, k):
  rng = np.random.default_rng(m + n + k)
  fn = jax.jit(lambda a, b, g, ta, tb: jax.vjp(lambda a, b: cpu_matmul.matmul(a, b, ta, tb), a, b)[1](g),
               static_argnums=(3, 4))
  for ta in (False, True):
    for tb in (False, True):
      a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
      b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
      g = rng.standard_normal((m, n)).astype(np.float32)
      a64, b64, g64 = a.astype(np.float64), b.astype(np.float64), g.astype(np.float64)
      opa, opb = (a64.T if ta else a64), (b64.T if tb else b64)
      got = np.asarray(jax.jit(cpu_matmul.matmul, static_argnums=(2, 3))(a, b, ta, tb))
      da, db = fn(a, b, g, ta, tb)
      want_da, want_db = g64 @ opb.T, opa.T @ g64
      for x, want in ((got, opa @ opb), (da, want_da.T if ta else want_da), (db, want_db.T if tb else want_db)):
        assert x.shape == want.shape
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-5 * np.sqrt(k + m + n) * max(np.abs(want).max(), 1))


@needs_kernel
@pytest.mark.parametrize("spec,lhs,rhs,kernel", [
    ("btd,dn->btn", (3, 5, 8), (8, 12), True),  # Dense
    ("btd,dhk->bthk", (3, 5, 8), (8, 2, 6), True),  # q/k/v projection
    ("bqhk,hkd->bqd", (3, 5, 2, 6), (2, 6, 8), True),  # output projection
    ("bqd,bkd->bqk", (3, 5, 8), (3, 7, 8), False),  # batched: XLA
    ("bqhd,bkhd->bhqk", (3, 5, 2, 4), (3, 7, 2, 4), False),
])
def test_dot_general_takes_projections_and_leaves_the_rest_to_xla(spec, lhs, rhs, kernel):
  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (lhs, rhs))
  f = lambda dg: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w, _dot_general=dg))),
                                            argnums=(0, 1)))
  ours, xla = f(dot_general("float32", "cpu_fused")), f(jax.lax.dot_general)
  assert (TARGET in ours.lower(x, w).as_text()) == kernel
  (v1, g1), (v2, g2) = ours(x, w), xla(x, w)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_models_pick_the_kernel_by_matmul_setting_and_match_xla():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(1, 50, (4, 9)), jnp.int32)
  res, params = {}, None
  for mm in ("xla", "cpu_fused"):
    vit = ViT(num_classes=0, patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, pool="map", matmul=mm)
    dec = Decoder(vocab_size=50, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=16, matmul=mm)

    def loss(p):
      pooled, aux = vit.apply(p["vit"], x)
      return jnp.sum(dec.apply(p["dec"], tokens, aux["tokens"]) ** 2) + jnp.sum(pooled ** 2)
    params = params or {"vit": jax.jit(vit.init)(jax.random.PRNGKey(0), x),
                        "dec": jax.jit(dec.init)(jax.random.PRNGKey(1), tokens, jnp.zeros((4, 17, 32)))}
    fn = jax.jit(jax.value_and_grad(loss))
    calls = fn.lower(params).as_text().count(TARGET)
    # Forward alone: q, k, v, out, fc1, fc2 of the encoder and of the MAP head, and the decoder's
    # self- and cross-attention projections and MLP (22); the backward adds two per product.
    assert calls >= 22 if mm == "cpu_fused" else calls == 0, (mm, calls)
    res[mm] = fn(params)
  (lx, gx), (lk, gk) = res["xla"], res["cpu_fused"]
  np.testing.assert_allclose(lk, lx, rtol=1e-5)
  # Against the largest gradient: the key biases' gradients are zero in exact arithmetic (softmax
  # ignores a shift shared by all logits), so both sides hold rounding noise there.
  scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(gx))
  for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def test_xla_setting_never_uses_the_kernel_and_bad_settings_are_clear_errors():
  assert dot_general("float32", "xla") is jax.lax.dot_general
  with pytest.raises(ValueError, match="runs float32 matmuls only, but dtype_mm is bfloat16"):
    dot_general("bfloat16", "cpu_fused")
  with pytest.raises(UserError, match="model.matmul='mkl' is not one of auto, xla, cpu_fused"):
    module_kwargs({"matmul": "mkl"})
