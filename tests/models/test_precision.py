"""`dtype_mm="bfloat16"` matmuls: the custom VJP's products and gradients are exactly those of an f32
einsum on bf16-rounded operands (and bf16-rounded cotangents) for every contraction the models use;
a ViT trained with them tracks the f32 one; and XLA runs them as bf16 dots, not upcast to f32.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  for got, want in zip(vjp(g), ref_vjp(_round(g))):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dtype_mm_names():
  assert precision.dot_general("float32", "xla") is jax.lax.dot_general
  assert precision.dot_general(jnp.bfloat16) is precision.bf16_dot_general
  with pytest.raises(ValueError, match="dtype_mm must be one of"):
    precision.dot_general("float16")


def test_bf16_operands_reach_the_dot_as_bf16():
  """Weight gradients contract over the batch axes; unless their operands are laid out row-major,
  XLA:CPU upcasts those dots to f32 (or fails: its fallback has no bf16 x bf16 -> f32 dot)."""
  model = ViT(num_classes=4, patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2, dtype_mm=jnp.bfloat16,
              attention="xla")  # XLA's attention dots too (the fused CPU kernel has its own test)
  x = jnp.ones((4, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), x)
  step = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x)[0] ** 2)))
  hlo = step.lower(params).compile().as_text()
  dots, types = [], {}
  for line in hlo.splitlines():  # operand types, looked up in the dot's own computation
    if line.endswith("{"):
      types = {}
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
    if m:
      types[m.group(1)] = m.group(2)
    d = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
    if d:
      dots.append((types.get(d.group(1)), types.get(d.group(2))))
  # Every dot of the encoder (q, k, v, logits, values, output, fc1, fc2: forward and both gradients)
  # takes bf16 operands; only the f32 classifier head's dots (forward, two gradients) do not.
  assert len(dots) >= 24, dots
  assert sum(d != ("bf16", "bf16") for d in dots) <= 3, dots
  jax.block_until_ready(step(params))  # and the backend runs them


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
