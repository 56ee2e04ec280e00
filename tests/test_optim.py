"""Optimizer: no weight decay on biases, norms, position embeddings; schedules."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import config, optim


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
