"""`dtype_mm="bfloat16"` matmuls: products equal an f32 einsum of bf16-rounded operands for every
contraction the models use, and gradients are autodiff's through the casts; in a ViT every
encoder dot multiplies bf16 operands into an f32 result; a ViT trained with them tracks the f32 one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from vlm_jax.models import precision
from vlm_jax.models.vit import ViT

SPECS = [  # the models' contractions: dense, q/k/v projection, attention logits and values, output projection
    ("nk,km->nm", (12, 16), (16, 24)),
    ("btd,dm->btm", (3, 5, 16), (16, 24)),
    ("btd,dhk->bthk", (3, 5, 16), (16, 2, 8)),
    ("bqhk,bthk->bhqt", (3, 5, 2, 8), (3, 7, 2, 8)),
    ("bhqt,bthk->bqhk", (3, 2, 5, 7), (3, 7, 2, 8)),
    ("bqhk,hkd->bqd", (3, 5, 2, 8), (2, 8, 16)),
]


def _round(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_bf16_products_and_gradients_equal_rounded_f32_einsum(spec, sa, sb):
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (sa, sb))
  out, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y, _dot_general=precision.bf16_dot_general), a, b)
  ref, ref_vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y, precision="highest"), _round(a), _round(b))
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(out - jnp.einsum(spec, a, b)))) > 1e-4  # the operands really were rounded
  # Each gradient is the f32 cotangent times the other rounded operand, accumulated in f32 and
  # rounded to bf16 where it passes back through the operand's cast.
  g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  for got, want in zip(vjp(g), ref_vjp(g)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, _round(got))
    np.testing.assert_allclose(got, want, rtol=8e-3, atol=1e-6 * float(jnp.abs(want).max()))


def test_dtype_mm_names():
  assert precision.dot_general("float32") is jax.lax.dot_general
  assert precision.dot_general(jnp.bfloat16) is precision.bf16_dot_general
  assert precision.conv_general_dilated("float32") is jax.lax.conv_general_dilated
  assert precision.conv_general_dilated("bfloat16") is precision.bf16_conv_general_dilated
  with pytest.raises(ValueError, match="dtype_mm must be one of"):
    precision.dot_general("float16")


def _dots(jaxpr):
  """(operand dtypes, result dtype) of every dot_general / conv in `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found.append((tuple(v.aval.dtype.name for v in eqn.invars), eqn.outvars[0].aval.dtype.name))
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          found += _dots(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          found += _dots(sub)
  return found


def test_vit_dots_take_bf16_operands_into_f32():
  """The encoder's dots (patch embedding, q, k, v, logits, values, output, fc1, fc2) multiply bf16
  operands into f32; only the f32 classifier head does not. In the gradient, every dot of the
  encoder has one of the saved bf16 operands, except the patch embedding's kernel gradient (JAX's
  conv transpose multiplies in the cotangent's f32)."""
  model = ViT(num_classes=4, patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2, dtype_mm=jnp.bfloat16)
  x = jnp.ones((4, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), x)
  fwd = _dots(jax.make_jaxpr(lambda p: model.apply(p, x)[0])(params).jaxpr)
  assert len(fwd) == 10, fwd
  assert fwd.count((("bfloat16", "bfloat16"), "float32")) == 9, fwd
  grads = _dots(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply(p, x)[0] ** 2)))(params).jaxpr)
  assert len(grads) >= 3 * 9, grads
  # The head's forward and two gradients, and the patch embedding's kernel gradient.
  assert sum("bfloat16" not in ops for ops, _ in grads) == 4, grads
  assert all(out == "float32" for _, out in grads), grads


def test_vit_with_bf16_matmuls_tracks_f32():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 16, 3)), jnp.float32)
  kw = dict(num_classes=4, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, head_zero_init=False)
  params = ViT(**kw).init(jax.random.PRNGKey(0), x)
  grads = {}
  for mm in ("float32", "bfloat16"):
    model = ViT(**kw, dtype_mm=jnp.dtype(mm))
    loss, g = jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x)[0] ** 2))(params)
    grads[mm] = (float(loss), np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)]))
  (l32, g32), (l16, g16) = grads["float32"], grads["bfloat16"]
  assert abs(l16 - l32) < 2e-2 * abs(l32)
  cos = float(g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32))
  assert cos > 0.999, cos
