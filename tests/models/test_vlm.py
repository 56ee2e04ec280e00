"""TwoTower: unit-norm embeddings of both towers, head layouts of the SigLIP and CLIP recipes,
width checks, and the locked-tower mode passing no gradient into the tower."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models.vlm import TwoTower

IMG = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=48)
TXT = dict(vocab_size=30, width=24, depth=1, num_heads=2, mlp_dim=40, max_len=6)


def _init(m):
  images, tokens = jnp.ones((2, 16, 16, 3)), jnp.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
  return nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), images, tokens))["params"], images, tokens


def test_siglip_and_clip_layouts():
  siglip = TwoTower(image={**IMG, "pool": "map"}, text={**TXT, "pool": "last_position"})
  p, images, tokens = _init(siglip)
  assert set(p) == {"img", "txt", "txt_proj", "logit_scale", "logit_bias"}
  assert p["txt_proj"]["kernel"].shape == (24, 32) and "bias" in p["txt_proj"] and "map_head" in p["img"]
  zi, zt = jax.jit(siglip.apply)({"params": p}, images, tokens)
  assert zi.shape == zt.shape == (2, 32)
  np.testing.assert_allclose(jnp.linalg.norm(zi, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(zt, axis=-1), 1.0, atol=1e-5)
  assert float(p["logit_scale"]) == pytest.approx(np.log(10)) and float(p["logit_bias"]) == -10.0

  clip = TwoTower(image={**IMG, "pool": "cls", "pre_norm": True}, text={**TXT, "causal": True}, embed_dim=16,
                  image_proj=True, proj_bias=False, logit_bias_init=None)
  p, images, tokens = _init(clip)
  assert set(p) == {"img", "txt", "img_proj", "txt_proj", "logit_scale"}
  assert p["img_proj"] == {"kernel": p["img_proj"]["kernel"]} and p["img_proj"]["kernel"].shape == (32, 16)
  assert "pre_norm" in p["img"] and "cls" in p["img"]
  with pytest.raises(ValueError, match="width 24 but embed_dim is 32"):
    _init(TwoTower(image=IMG, text=TXT, text_proj=False))


def test_locked_tower_gets_no_gradient():
  m = TwoTower(image={**IMG, "pool": "gap"}, text=TXT)
  p, images, tokens = _init(m)

  def loss(params, locked):
    zi, zt = m.apply({"params": params}, images, tokens, locked=locked)
    return jnp.sum(zi @ zt.T)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  free, locked = grad(p, ()), grad(p, ("txt",))
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(locked["txt"]))
  assert float(jnp.abs(free["txt"]["token_embed"]["embedding"]).max()) > 0
  np.testing.assert_allclose(locked["txt_proj"]["kernel"], free["txt_proj"]["kernel"], atol=1e-6)
