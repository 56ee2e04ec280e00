"""ViT: output shapes per pooling, scan == unrolled, logical names on every parameter, posemb resize,
the patch embedding's parameter layout and values (flattened patches times the HWIO kernel), the
class-token-only last block (`pooled_only`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models.layers import EncoderBlock, stack_layers
from vlm_jax.models.vit import PatchEmbed, ViT, resize_posemb

KW = dict(patch_size=8, width=32, depth=2, mlp_dim=48, num_heads=4)


@pytest.mark.parametrize("pool,tokens", [("cls", 17), ("gap", 16), ("map", 16)])
def test_output_shapes(pool, tokens):
  m = ViT(num_classes=7, pool=pool, **KW)
  x = jnp.ones((3, 32, 32, 3))
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), x))
  logits, aux = m.apply(params, x)
  assert logits.shape == (3, 7)
  assert aux["tokens"].shape == (3, tokens, 32)
  assert aux["pooled"].shape == (3, 32)
  feats, _ = ViT(num_classes=0, pool=pool, **KW).apply(params, x)
  assert feats.shape == (3, 32)


def test_scan_matches_unrolled():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  scanned = ViT(num_classes=5, pool="gap", scan_layers=True, head_zero_init=False, **KW)
  unrolled = ViT(num_classes=5, pool="gap", scan_layers=False, head_zero_init=False, **KW)
  p = nn.meta.unbox(scanned.init(jax.random.PRNGKey(0), x))["params"]
  layers = p["encoder"].pop("layers")
  for i in range(KW["depth"]):
    p["encoder"][f"layers_{i}"] = jax.tree.map(lambda a: a[i], layers)
  a, _ = scanned.apply({"params": {**p, "encoder": {**p["encoder"], "layers": layers}}}, x)
  b, _ = unrolled.apply({"params": p}, x)
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert float(jnp.abs(a).max()) > 0


def test_pooled_only_prunes_the_last_block_with_the_same_logits_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  kw = dict(num_classes=5, pool="cls", scan_layers=False, head_zero_init=False, **{**KW, "depth": 3})
  full, pruned = ViT(**kw), ViT(pooled_only=True, **kw)
  assert pruned.prunes_last_layer() and not full.prunes_last_layer()
  p = nn.meta.unbox(full.init(jax.random.PRNGKey(0), x))
  assert jax.tree.structure(p) == jax.tree.structure(nn.meta.unbox(pruned.init(jax.random.PRNGKey(0), x)))
  (a, aux_a), (b, aux_b) = full.apply(p, x), pruned.apply(p, x)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert aux_b["tokens"].shape == (3, 1, 32) and aux_a["tokens"].shape == (3, 17, 32)
  np.testing.assert_allclose(aux_b["tokens"][:, 0], aux_a["tokens"][:, 0], rtol=1e-5, atol=1e-6)
  labels = jnp.array([0, 3, 4])
  grad = lambda m: jax.grad(lambda q: -jnp.take_along_axis(jax.nn.log_softmax(m.apply(q, x)[0]), labels[:, None],
                                                           1).sum())(p)
  ga, gb = grad(full), grad(pruned)
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(v, u, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The last block's query-side weights get gradient from the class token only; still non-zero.
  assert float(jnp.abs(gb["params"]["encoder"]["layers_2"]["mlp"]["fc1"]["kernel"]).max()) > 0


@pytest.mark.parametrize("change", [dict(pool="gap"), dict(pool="map"), dict(scan_layers=True)])
def test_pooled_only_leaves_other_models_whole(change):
  m = ViT(num_classes=5, pooled_only=True, **{**dict(pool="cls", scan_layers=False), **change}, **KW)
  assert not m.prunes_last_layer()
  x = jnp.ones((2, 32, 32, 3))
  _, aux = m.apply(nn.meta.unbox(m.init(jax.random.PRNGKey(0), x)), x)
  assert aux["tokens"].shape[1] == (17 if m.pool == "cls" else 16)


def test_encoder_block_queries_equal_the_full_blocks_first_rows_under_a_mask():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
  mask = jnp.tril(jnp.ones((6, 6), bool))[None, None] | jnp.eye(6, dtype=bool)[::-1][None, None]
  full, part = EncoderBlock(num_heads=4, mlp_dim=48), EncoderBlock(num_heads=4, mlp_dim=48, queries=2)
  p = full.init(jax.random.PRNGKey(1), x, mask)
  a, _ = full.apply(p, x, mask)
  b, _ = part.apply(p, x, mask)
  assert b.shape == (2, 2, 32)
  np.testing.assert_allclose(b, a[:, :2], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="post_ln"):
    EncoderBlock(num_heads=4, mlp_dim=48, queries=2, post_ln=True).apply(p, x)
  with pytest.raises(ValueError, match="scan=False"):
    stack_layers(EncoderBlock, 2, True, "none")({}, last_kwargs={"queries": 1})


def test_remat_same_output_and_grad():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  plain = ViT(num_classes=5, head_zero_init=False, **KW)
  remat = ViT(num_classes=5, head_zero_init=False, remat="nothing_saveable", **KW)
  p = nn.meta.unbox(plain.init(jax.random.PRNGKey(0), x))
  loss = lambda m: jax.grad(lambda q: m.apply(q, x)[0].sum())(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), loss(plain), loss(remat))


def test_every_parameter_has_logical_names():
  m = ViT(num_classes=5, pool="map", **KW)
  boxed = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3))))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


def test_resize_posemb_keeps_prefix_and_interpolates():
  """2x2 -> 4x4 by hand: half-pixel bilinear, edges clamped, so along each axis [a, b] becomes
  [a, (3a + b) / 4, (a + 3b) / 4, b]; the grid is row-major (y, x) and the class-token row is kept."""
  grid = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)  # not symmetric: a transposed resize fails
  pos = np.concatenate([np.full((1, 1, 2), -5.0, np.float32),
                        np.stack([grid, -grid], axis=-1).reshape(1, 4, 2)], axis=1)  # two channels
  out = resize_posemb(pos, 1 + 16, num_prefix=1)
  want = np.array([[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]], np.float32)
  assert out.shape == (1, 17, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0, 0], [-5.0, -5.0])
  np.testing.assert_allclose(out[0, 1:, 0].reshape(4, 4), want, atol=1e-6)
  np.testing.assert_allclose(out[0, 1:, 1].reshape(4, 4), -want, atol=1e-6)
  # No prefix (gap / map models): the same grid, nothing kept aside.
  np.testing.assert_allclose(resize_posemb(pos[:, 1:], 16, 0)[0, :, 0].reshape(4, 4), want, atol=1e-6)
  assert np.array_equal(resize_posemb(pos, 5, 1), pos)
  with pytest.raises(ValueError):
    resize_posemb(pos, 1 + 50, 1)


def test_bf16_compute_keeps_f32_params():
  m = ViT(num_classes=5, dtype=jnp.bfloat16, **KW)
  x = jnp.ones((2, 32, 32, 3))
  p = nn.meta.unbox(m.init(jax.random.PRNGKey(0), x))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))
  logits, aux = m.apply(p, x)
  assert aux["tokens"].dtype == jnp.bfloat16


def _patch_matmul(x, kernel, bias):
  """The patch embedding written out: VALID p x p patches (trailing pixels dropped), each flattened
  in (row, column, channel) order, times the [p, p, C, D] kernel flattened the same way."""
  p, _, c, d = kernel.shape
  b, gh, gw = x.shape[0], x.shape[1] // p, x.shape[2] // p
  patches = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(b, gh, gw, p * p * c) @ kernel.reshape(p * p * c, d) + bias


@pytest.mark.parametrize("dtype_mm", [jnp.float32, jnp.bfloat16])
def test_patch_embedding_keeps_the_hwio_layout_and_computes_the_patch_matmul(dtype_mm):
  """PatchEmbed's parameters are `kernel` [p, p, C, D] and `bias` [D] (the layout checkpoints and the
  Hugging Face export use), and it computes flattened patches times that kernel, with bf16
  operands under dtype_mm bf16."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 35, 33, 3)), jnp.float32)
  pe = PatchEmbed(24, 8, dtype_mm=dtype_mm)
  params = nn.unbox(jax.jit(pe.init)(jax.random.PRNGKey(0), x))["params"]
  assert jax.tree.map(jnp.shape, params) == {"kernel": (8, 8, 3, 24), "bias": (24,)}
  params = {"kernel": params["kernel"], "bias": params["bias"] + 0.1}
  got = pe.apply({"params": params}, x)
  assert got.shape == (2, 4, 4, 24) and got.dtype == jnp.float32
  rnd = (lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)) if dtype_mm == jnp.bfloat16 else (lambda a: a)
  want = _patch_matmul(rnd(x), rnd(params["kernel"]), params["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  if dtype_mm == jnp.bfloat16:  # the operands really were rounded
    assert float(jnp.abs(got - _patch_matmul(x, params["kernel"], params["bias"])).max()) > 1e-3
