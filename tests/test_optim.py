"""Optimizer: no weight decay on biases, norms, position embeddings; schedules."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config, optim
from vlm_jax.errors import UserError


def test_decay_mask_and_decay_effect():
  cfg = config.base_config().optimizer
  params = {"encoder": {"ln1": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
                        "attn": {"query_kernel": jnp.ones((3, 2, 2))}},
            "pos_embedding": jnp.ones((1, 4, 3)), "head": {"kernel": jnp.ones((3, 5))}}
  mask = optim.path_mask(params, cfg.no_decay, match_value=False)
  assert mask["encoder"]["attn"]["query_kernel"] and mask["head"]["kernel"]
  assert not mask["encoder"]["ln1"]["scale"] and not mask["encoder"]["ln1"]["bias"]
  assert not mask["pos_embedding"]
  cfg.weight_decay, cfg.warmup_steps, cfg.schedule = 0.5, 0, "constant"
  tx, _ = optim.make(cfg, 10, params)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["head"]["kernel"]).max()) > 0  # decayed although the gradient is zero
  assert float(jnp.abs(updates["pos_embedding"]).max()) == 0
  assert float(jnp.abs(updates["encoder"]["ln1"]["scale"]).max()) == 0


def test_warmup_then_cosine():
  cfg = config.base_config().optimizer
  cfg.learning_rate, cfg.warmup_steps = 1.0, 10
  sched = optim.make_schedule(cfg, 110)
  assert float(sched(0)) == 0.0 and np.isclose(float(sched(10)), 1.0)
  assert np.isclose(float(sched(60)), 0.5, atol=1e-3) and float(sched(110)) < 1e-6


def _sgd(**kw):
  cfg = config.base_config().optimizer
  cfg.update({**dict(name="sgd", b1=0.0, weight_decay=0.0, warmup_steps=0, schedule="constant",
                     learning_rate=1.0, grad_clip_norm=0.0), **kw})
  return cfg


def _stacked_params(depth=3, scan=True):
  layer = lambda: {"attn": {"kernel": jnp.ones((4, 4))}, "ln": {"scale": jnp.ones(4)}}
  if scan:
    enc = {"layers": jax.tree.map(lambda x: jnp.stack([x] * depth), layer())}
  else:
    enc = {f"layers_{i}": layer() for i in range(depth)}
  return {"img": {"embedding": {"kernel": jnp.ones((2, 4))}, "pos_embedding": jnp.ones((1, 5, 4)),
                  "encoder": enc, "encoder_norm": {"scale": jnp.ones(4)}},
          "txt": {"layers_0": {"mlp": jnp.ones(4)}, "head": jnp.ones(4)}}


def _one_update(cfg, params):
  tx, _ = optim.make(cfg, 10, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(lambda u: -np.asarray(u), updates)  # SGD, lr 1, grad 1: the lr factor itself


def test_freeze_gives_zero_updates_and_no_optimizer_state():
  params = _stacked_params()
  cfg = _sgd(freeze="^img/", b1=0.9)
  tx, _ = optim.make(cfg, 10, params)
  state = tx.init(params)
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim)  # scalars: step counters
  n_txt = sum(x.size for x in jax.tree.leaves(params["txt"]))
  assert n_state == n_txt  # momentum only for the trainable tower
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["img"]))
  assert all(float(jnp.abs(u).min()) > 0 for u in jax.tree.leaves(updates["txt"]))
  grads = optim.zero_frozen(cfg, jax.tree.map(jnp.ones_like, params))
  assert float(grads["img"]["pos_embedding"].max()) == 0 and float(grads["txt"]["head"].min()) == 1


def test_freeze_errors_name_the_problem():
  params = _stacked_params()
  for pattern, words in (("^nothing/", "matches no parameter"), (".*", "every parameter"),
                         ("([", "not a valid regex")):
    with pytest.raises(UserError, match=re.escape(words)):
      optim.make(_sgd(freeze=pattern), 10, params)


def test_lr_multipliers_first_match_wins():
  up = _one_update(_sgd(lr_multipliers="head=10; ^txt/=0.5 ;^img/=0.1"), _stacked_params())
  assert np.allclose(up["txt"]["head"], 10) and np.allclose(up["txt"]["layers_0"]["mlp"], 0.5)
  assert np.allclose(up["img"]["pos_embedding"], 0.1)
  with pytest.raises(UserError, match="REGEX=MULTIPLIER"):
    optim.make(_sgd(lr_multipliers="^img/"), 10, _stacked_params())


@pytest.mark.parametrize("scan", [True, False])
def test_layer_decay_scanned_and_unrolled_agree(scan):
  d = 0.5
  up = _one_update(_sgd(layer_decay=d, layer_decay_scope="^img/", lr_multipliers="^img/=2"),
                   _stacked_params(3, scan))
  enc = up["img"]["encoder"]
  per_layer = ([enc["layers"]["attn"]["kernel"][i] for i in range(3)] if scan
               else [enc[f"layers_{i}"]["attn"]["kernel"] for i in range(3)])
  assert [float(x.mean()) for x in per_layer] == [2 * d ** 3, 2 * d ** 2, 2 * d]  # last layer: d ** 1
  assert np.allclose(up["img"]["pos_embedding"], 2 * d ** 4)
  assert np.allclose(up["img"]["embedding"]["kernel"], 2 * d ** 4)
  assert np.allclose(up["img"]["encoder_norm"]["scale"], 2)
  assert np.allclose(up["txt"]["layers_0"]["mlp"], 1)  # outside the scope


def test_layer_decay_needs_one_stack():
  with pytest.raises(UserError, match="exactly one layer stack"):
    optim.make(_sgd(layer_decay=0.8), 10, _stacked_params())
