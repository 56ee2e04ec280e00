"""The optax chain from `config.optimizer`: clipping, AdamW/SGD, warmup + decay, decay mask,
frozen parameters, per-group learning-rate multipliers and layer-wise learning-rate decay.

Parameters are addressed by their path, e.g. 'img/encoder/layers_3/attn/query_kernel' (a scanned
stack has one 'layers' entry whose leading axis is the layer index).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from vlm_jax.errors import UserError

_LAYER = re.compile(r"(^|/)(layers)(?:_(\d+))?(/|$)")


def param_path(path) -> str:
  """A pytree key path as 'encoder/layers/attn/query_kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def path_mask(params, pattern: str, match_value: bool = True):
  """A boolean tree: `match_value` where the parameter's path matches the regex, else the opposite."""
  rx = _compile(pattern, "a parameter regex")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: bool(rx.search(param_path(p))) == match_value, params)


def _compile(pattern: str, key: str):
  try:
    return re.compile(pattern)
  except re.error as e:
    raise UserError(f"optimizer.{key}='{pattern}' is not a valid regex ({e}). Fix the pattern.") from None


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


def frozen_mask(ocfg, params):
  """True for parameters matching `optimizer.freeze` (None when nothing is frozen)."""
  if not ocfg.freeze:
    return None
  mask = path_mask(params, ocfg.freeze)
  n = sum(jax.tree.leaves(mask))
  if n == 0:
    raise UserError(f"optimizer.freeze='{ocfg.freeze}' matches no parameter. Parameter paths look like "
                    f"'{_first_path(params)}'.")
  if n == len(jax.tree.leaves(mask)):
    raise UserError(f"optimizer.freeze='{ocfg.freeze}' freezes every parameter; nothing would train.")
  return mask


def zero_frozen(ocfg, grads):
  """Gradients of frozen parameters replaced by constants, so XLA drops their computation."""
  mask = frozen_mask(ocfg, grads)
  if mask is None:
    return grads
  return jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, mask)


def _first_path(params) -> str:
  return param_path(jax.tree_util.tree_flatten_with_path(params)[0][0][0])


def _parse_multipliers(spec: str) -> list:
  """'REGEX=MULT;REGEX=MULT' -> [(compiled regex, float)]; the first matching regex wins."""
  out = []
  for item in (s.strip() for s in spec.split(";") if s.strip()):
    pattern, eq, value = item.rpartition("=")
    try:
      mult = float(value)
    except ValueError:
      mult = None
    if not eq or mult is None or mult < 0:
      raise UserError(f"optimizer.lr_multipliers item '{item}' is not REGEX=MULTIPLIER "
                      f"(e.g. '^img/=0.1;head=10'). Fix the value.")
    out.append((_compile(pattern, "lr_multipliers"), mult))
  return out


def _stacks(paths_shapes, scope) -> dict:
  """{stack prefix: depth} of the layer stacks ('.../layers' scanned or '.../layers_I') in scope."""
  stacks = {}
  for path, shape in paths_shapes:
    m = _LAYER.search(path)
    if not m or not scope.search(path):
      continue
    prefix = path[:m.start(2)]
    depth = (int(m.group(3)) + 1) if m.group(3) is not None else shape[0]
    stacks[prefix] = max(stacks.get(prefix, 0), depth)
  return stacks


def lr_factors(ocfg, params):
  """Per-parameter learning-rate factors (floats, or [L, 1, ...] arrays for scanned stacks), or None.

  `lr_multipliers` scales matching groups. `layer_decay` (BEiT-style layer-wise decay) gives layer
  i of the one layer stack inside `layer_decay_scope` the factor decay**(L - i), the scope's
  embeddings (`layer_decay_embed`) decay**(L + 1), and everything after the stack 1.
  """
  groups = _parse_multipliers(ocfg.lr_multipliers)
  decay = float(ocfg.layer_decay)
  if not groups and not decay:
    return None
  if decay and not 0 < decay <= 1:
    raise UserError(f"optimizer.layer_decay={decay} must be in (0, 1] (0 disables it).")
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  paths_shapes = [(param_path(p), np.shape(x)) for p, x in leaves]
  scope = _compile(ocfg.layer_decay_scope, "layer_decay_scope")
  embed = _compile(ocfg.layer_decay_embed, "layer_decay_embed")
  stacks = _stacks(paths_shapes, scope) if decay else {}
  if decay and len(stacks) != 1:
    found = ", ".join(f"'{s}layers' ({d})" for s, d in stacks.items()) or "none"
    raise UserError(f"optimizer.layer_decay needs exactly one layer stack inside layer_decay_scope="
                    f"'{ocfg.layer_decay_scope}'; found {found}. Narrow the scope, e.g. '^img/'.")
  (prefix, depth), = stacks.items() if decay else ((None, 0),)

  def factor(path, shape):
    f = next((mult for rx, mult in groups if rx.search(path)), 1.0)
    if not decay or not scope.search(path):
      return f
    m = _LAYER.search(path)
    if m and path[:m.start(2)] == prefix:
      if m.group(3) is not None:
        return f * decay ** (depth - int(m.group(3)))
      per_layer = decay ** (depth - np.arange(depth, dtype=np.float32))
      return f * per_layer.reshape((depth,) + (1,) * (len(shape) - 1))
    return f * decay ** (depth + 1) if embed.search(path) else f

  factors = [factor(path, shape) for path, shape in paths_shapes]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), factors)


def scale_by_factors(factors) -> optax.GradientTransformation:
  """Multiplies each update by its (static) factor: a learning-rate multiplier after the optimizer."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def state_specs(opt_state, params, param_specs):
  """Logical PartitionSpecs for an optimizer state: a leaf whose key path ends with a parameter's
  path and has its shape (moments, momentum) takes that parameter's spec; the rest (step counters,
  scalars) is replicated. Works through masked / multi_transform states, which optax's
  tree_map_params does not."""
  flat = lambda t: jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: isinstance(x, P))[0]
  by_path = {param_path(p): (np.shape(x), s) for (p, x), (_, s) in zip(flat(params), flat(param_specs))}

  def spec(path, x):
    parts = param_path(path).split("/")
    for i in range(len(parts)):  # longest matching suffix first
      shape, s = by_path.get("/".join(parts[i:]), (None, None))
      if shape == np.shape(x):
        return s
    return P()
  return jax.tree_util.tree_map_with_path(spec, opt_state)


def make(ocfg, total_steps: int, params):
  """Returns (tx, schedule). Weight decay skips parameters matching `optimizer.no_decay`; frozen
  parameters (`optimizer.freeze`) get zero updates and no optimizer state."""
  schedule = make_schedule(ocfg, total_steps)
  frozen = frozen_mask(ocfg, params)
  decay_mask = lambda p: path_mask(p, ocfg.no_decay, match_value=False)
  if ocfg.name == "adamw":
    opt = optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay,
                      mask=decay_mask)
  elif ocfg.name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(ocfg.weight_decay, decay_mask),
                      optax.sgd(schedule, momentum=ocfg.b1))
  else:
    raise UserError(f"optimizer.name='{ocfg.name}' is unknown; use adamw or sgd.")
  chain = [optax.clip_by_global_norm(ocfg.grad_clip_norm)] if ocfg.grad_clip_norm else []
  chain.append(opt)
  factors = lr_factors(ocfg, params)
  if factors is not None:
    chain.append(scale_by_factors(factors if frozen is None else _drop(factors, frozen)))
  tx = optax.chain(*chain)
  if frozen is not None:
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def _drop(tree, mask):
  """`tree` with masked leaves replaced by optax.MaskedNode (the view a multi_transform group sees)."""
  return jax.tree.map(lambda x, m: optax.MaskedNode() if m else x, tree, mask)
