"""The fused CPU attention kernel (`models.cpu_attention`), both builds: its outputs and q/k/v
gradients equal XLA's attention with the same matmul precision (attention="xla", `dtype_mm` bf16 or
f32) for self, causal and cross attention, odd sizes and bf16 inputs; the models pick it by
`attention`; a bad setting is a clear error. Each build's tests skip where this CPU cannot run it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.models import cpu_attention
from vlm_jax.models.precision import MM_DTYPES, bf16_dot_general
from vlm_jax.models.text import Decoder
from vlm_jax.models.vit import ViT
from vlm_jax.tasks.common import module_kwargs

TARGET = {"bfloat16": "vlm_jax_attention_", "float32": "vlm_jax_attention_f32_"}


def _builds(*precisions):
  """The kernel builds as test parameters, each skipped where this machine cannot run it."""
  return [pytest.param(p, marks=pytest.mark.skipif(cpu_attention.unavailable(p) is not None,
                                                   reason=str(cpu_attention.unavailable(p))))
          for p in precisions]


def _xla_attention(q, k, v, causal, precision):
  """XLA's path of MultiHeadAttention (matmuls in `precision`, f32 softmax) on [B, T, H, D] arrays."""
  dg = bf16_dot_general if precision == "bfloat16" else jax.lax.dot_general
  logits = jnp.einsum("bqhk,bthk->bhqt", q, k, _dot_general=dg) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bhqt,bthk->bqhk", weights, v, _dot_general=dg)


@pytest.mark.parametrize("precision", _builds(*cpu_attention.PRECISIONS))
@pytest.mark.parametrize("b,tq,tk,h,d,causal,dtype", [
    (2, 17, 17, 3, 16, False, jnp.float32),  # fewer rows than one micro-kernel block
    (2, 37, 37, 2, 8, True, jnp.float32),    # causal self-attention
    (3, 9, 41, 2, 6, False, jnp.float32),    # cross-attention, odd lengths, head_dim not a multiple of 16
    (2, 50, 50, 4, 32, False, jnp.float32),  # several micro-kernel rows and column panels
    (2, 13, 13, 2, 8, True, jnp.bfloat16),   # bf16 activations
    (2, 1, 20, 2, 16, False, jnp.float32),   # one query (a class-token-only last block), keys read in place
    (2, 5, 23, 2, 32, False, jnp.float32),   # fewer queries than a micro-kernel block: packed
])
def test_kernel_matches_xla_attention(b, tq, tk, h, d, causal, dtype, precision):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((b, tq, h, d)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, tk, h, d)), dtype) for _ in range(2))
  g = jnp.asarray(rng.standard_normal((b, tq, h, d)), dtype)
  scale = 1.0 / np.sqrt(d)
  out, vjp = jax.jit(lambda *a: jax.vjp(lambda *x: cpu_attention.attention(*x, scale, causal, precision), *a))(
      q, k, v)
  ref, ref_vjp = jax.jit(lambda *a: jax.vjp(lambda *x: _xla_attention(*x, causal, precision), *a))(q, k, v)
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3 if precision == "bfloat16" else 2e-5
  assert out.dtype == dtype and out.shape == ref.shape
  np.testing.assert_allclose(np.float32(out), np.float32(ref), rtol=tol, atol=tol)
  for got, want in zip(vjp(g), ref_vjp(g)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol * float(jnp.abs(want).max()))
  if causal:  # the last key must not reach the first query: its value moves nothing there
    out2 = cpu_attention.attention(q, k, v.at[:, -1].add(100.0), scale, causal, precision)
    np.testing.assert_array_equal(np.float32(out2[:, 0]), np.float32(out[:, 0]))


@pytest.mark.parametrize("precision", _builds(*cpu_attention.PRECISIONS))
def test_models_pick_the_kernel_by_attention_setting(precision):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 3)), jnp.float32)
  grads, outs = {}, {}
  params = None  # the same for every setting
  for att in ("auto", "xla", "cpu_fused"):
    model = ViT(num_classes=3, patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2,
                dtype_mm=MM_DTYPES[precision], attention=att)
    params = params or jax.jit(model.init)(jax.random.PRNGKey(0), x)
    loss = lambda p: jnp.sum(model.apply(p, x)[0] ** 2)
    fn = jax.jit(jax.value_and_grad(loss))
    hlo = fn.lower(params).as_text()
    for part in ("fwd", "bwd"):
      assert (TARGET[precision] + part in hlo) == (att != "xla"), (att, part)
    if att != "cpu_fused":  # the same program as "auto"
      outs[att], grads[att] = fn(params)
  tol = 2e-3 if precision == "bfloat16" else 1e-5
  np.testing.assert_allclose(outs["auto"], outs["xla"], rtol=tol)
  for a, b in zip(jax.tree.leaves(grads["auto"]), jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol * float(jnp.abs(b).max()) + 1e-7)


@pytest.mark.parametrize("precision", _builds(*cpu_attention.PRECISIONS))
def test_decoder_causal_and_cross_attention_match_xla(precision):
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(1, 50, (3, 11)), jnp.int32)
  encoded = jnp.asarray(rng.standard_normal((3, 21, 32)), jnp.float32)
  res, params = {}, None
  for att in ("xla", "cpu_fused"):
    dec = Decoder(vocab_size=50, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=16,
                  dtype_mm=MM_DTYPES[precision], attention=att)
    params = params or jax.jit(dec.init)(jax.random.PRNGKey(0), tokens, encoded)
    res[att] = jax.jit(jax.value_and_grad(lambda p, e: jnp.sum(dec.apply(p, tokens, e) ** 2), argnums=(0, 1)))(
        params, encoded)
  (lx, gx), (lk, gk) = res["xla"], res["cpu_fused"]
  tol = 2e-3 if precision == "bfloat16" else 1e-5
  np.testing.assert_allclose(lk, lx, rtol=tol)
  for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol * float(jnp.abs(b).max()) + 1e-7)


def test_bad_attention_setting_is_a_clear_error():
  with pytest.raises(UserError, match="model.attention=.flash. is not one of auto, xla, cpu_fused, cudnn"):
    module_kwargs({"attention": "flash"})
