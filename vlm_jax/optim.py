"""The optax chain from `config.optimizer`: clipping, AdamW/SGD, warmup + decay, decay mask."""

import re

import jax
import optax

from vlm_jax.errors import UserError


def param_path(path) -> str:
  """A pytree key path as 'encoder/layers/attn/query_kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def path_mask(params, pattern: str, match_value: bool = True):
  """A boolean tree: `match_value` where the parameter's path matches the regex, else the opposite."""
  rx = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: bool(rx.search(param_path(p))) == match_value, params)


def make_schedule(ocfg, total_steps: int):
  lr, warmup = ocfg.learning_rate, min(ocfg.warmup_steps, total_steps)
  end = lr * ocfg.end_lr_ratio
  if ocfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
  if ocfg.schedule == "linear":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.linear_schedule(lr, end, max(total_steps - warmup, 1))], [warmup])
  if ocfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  raise UserError(f"optimizer.schedule='{ocfg.schedule}' is unknown; use cosine, linear or constant.")


def make(ocfg, total_steps: int, params):
  """Returns (tx, schedule). Weight decay skips parameters matching `optimizer.no_decay`."""
  schedule = make_schedule(ocfg, total_steps)
  decay_mask = path_mask(params, ocfg.no_decay, match_value=False)
  if ocfg.name == "adamw":
    opt = optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay,
                      mask=decay_mask)
  elif ocfg.name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(ocfg.weight_decay, decay_mask),
                      optax.sgd(schedule, momentum=ocfg.b1))
  else:
    raise UserError(f"optimizer.name='{ocfg.name}' is unknown; use adamw or sgd.")
  chain = [optax.clip_by_global_norm(ocfg.grad_clip_norm)] if ocfg.grad_clip_norm else []
  return optax.chain(*chain, opt), schedule
