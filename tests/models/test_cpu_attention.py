"""The fused CPU attention kernel (`models.cpu_attention`): its outputs and q/k/v gradients equal XLA's
attention with bf16 matmuls (`dtype_mm="bfloat16"`, attention="xla") for self, causal and cross
attention, odd sizes and bf16 inputs; the models pick it by `attention`; a bad setting is a clear
error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.models import cpu_attention
from vlm_jax.models.precision import bf16_dot_general
from vlm_jax.models.text import Decoder
from vlm_jax.models.vit import ViT
from vlm_jax.tasks.common import module_kwargs

needs_kernel = pytest.mark.skipif(cpu_attention.unavailable() is not None,
                                  reason=str(cpu_attention.unavailable()))


def _xla_attention(q, k, v, causal):
  """XLA's path of MultiHeadAttention (bf16 matmul operands, f32 softmax) on [B, T, H, D] arrays."""
  dg = bf16_dot_general
  logits = jnp.einsum("bqhk,bthk->bhqt", q, k, _dot_general=dg) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bhqt,bthk->bqhk", weights, v, _dot_general=dg)


@needs_kernel
@pytest.mark.parametrize("b,tq,tk,h,d,causal,dtype", [
    (2, 17, 17, 3, 16, False, jnp.float32),  # fewer rows than one micro-kernel block
    (2, 37, 37, 2, 8, True, jnp.float32),    # causal self-attention
    (3, 9, 41, 2, 6, False, jnp.float32),    # cross-attention, odd lengths, head_dim not a multiple of 16
    (2, 50, 50, 4, 32, False, jnp.float32),  # several micro-kernel rows and column panels
    (2, 13, 13, 2, 8, True, jnp.bfloat16),   # bf16 activations
])
def test_kernel_matches_xla_bf16_attention(b, tq, tk, h, d, causal, dtype):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((b, tq, h, d)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, tk, h, d)), dtype) for _ in range(2))
  g = jnp.asarray(rng.standard_normal((b, tq, h, d)), dtype)
  scale = 1.0 / np.sqrt(d)
  out, vjp = jax.jit(lambda *a: jax.vjp(lambda *x: cpu_attention.attention(*x, scale, causal), *a))(q, k, v)
  ref, ref_vjp = jax.jit(lambda *a: jax.vjp(lambda *x: _xla_attention(*x, causal), *a))(q, k, v)
  tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
  assert out.dtype == dtype and out.shape == ref.shape
  np.testing.assert_allclose(np.float32(out), np.float32(ref), rtol=tol, atol=tol)
  for got, want in zip(vjp(g), ref_vjp(g)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol * float(jnp.abs(want).max()))
  if causal:  # the last key must not reach the first query: its value moves nothing there
    out2 = cpu_attention.attention(q, k, v.at[:, -1].add(100.0), scale, causal)
    np.testing.assert_array_equal(np.float32(out2[:, 0]), np.float32(out[:, 0]))


@needs_kernel
def test_models_pick_the_kernel_by_attention_setting():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 3)), jnp.float32)
  grads, outs = {}, {}
  for att in ("auto", "xla", "cpu_fused"):
    model = ViT(num_classes=3, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, dtype_mm=jnp.bfloat16,
                attention=att)
    params = model.init(jax.random.PRNGKey(0), x)
    loss = lambda p: jnp.sum(model.apply(p, x)[0] ** 2)
    fn = jax.jit(jax.value_and_grad(loss))
    hlo = fn.lower(params).compile().as_text()
    assert ("vlm_jax_attention_fwd" in hlo) == (att != "xla") and ("vlm_jax_attention_bwd" in hlo) == (att != "xla")
    outs[att], grads[att] = fn(params)
  for att in ("auto", "cpu_fused"):
    np.testing.assert_allclose(outs[att], outs["xla"], rtol=2e-3)
    for a, b in zip(jax.tree.leaves(grads[att]), jax.tree.leaves(grads["xla"])):
      np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3 * float(jnp.abs(b).max()) + 1e-7)
  # f32 matmuls keep XLA's attention under "auto"
  model = ViT(num_classes=3, patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, attention="auto")
  params = model.init(jax.random.PRNGKey(0), x)
  assert "vlm_jax_attention" not in jax.jit(model.apply).lower(params, x).compile().as_text()


@needs_kernel
def test_decoder_causal_and_cross_attention_match_xla():
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(1, 50, (3, 11)), jnp.int32)
  encoded = jnp.asarray(rng.standard_normal((3, 21, 32)), jnp.float32)
  res = {}
  for att in ("xla", "cpu_fused"):
    dec = Decoder(vocab_size=50, width=32, depth=2, num_heads=2, mlp_dim=64, max_len=16, dtype_mm=jnp.bfloat16,
                  attention=att)
    params = dec.init(jax.random.PRNGKey(0), tokens, encoded)
    res[att] = jax.jit(jax.value_and_grad(lambda p, e: jnp.sum(dec.apply(p, tokens, e) ** 2), argnums=(0, 1)))(
        params, encoded)
  (lx, gx), (lk, gk) = res["xla"], res["cpu_fused"]
  np.testing.assert_allclose(lk, lx, rtol=2e-3)
  for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3 * float(jnp.abs(b).max()) + 1e-7)


def test_bad_attention_setting_is_a_clear_error():
  with pytest.raises(UserError, match="model.attention='flash' is not one of auto, xla, cpu_fused"):
    module_kwargs({"attention": "flash"})
