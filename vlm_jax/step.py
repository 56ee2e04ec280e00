"""The jitted train step of a Runtime: loss and gradients (accumulated over microbatches), the
frozen groups' gradients zeroed, the optax update, and the guard against non-finite steps."""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import optim, parallel
from vlm_jax.runtime import Runtime, TrainState


def accumulated_grads(loss_fn, steps: int, mesh):
  """value_and_grad of `loss_fn`, averaged over `steps` microbatches in a lax.scan.

  The update equals the full batch's when the loss is a mean over examples (exactly so for
  classification; token-weighted losses become a mean of microbatch means), with 1/steps of the
  activation memory. Microbatch j takes rows j, j+steps, ... so it stays spread over every device
  without moving data. Microbatch j's key is fold_in(rng, j).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn
  spread = NamedSharding(mesh, P(None, parallel.BATCH_AXES))

  def split(x):
    x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spread)

  def fn(params, batch, rng):
    micro = jax.tree.map(split, batch)

    def body(acc, xs):
      j, mb = xs
      out = grad_fn(params, mb, jax.random.fold_in(rng, j))
      return jax.tree.map(jnp.add, acc, out), None
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(grad_fn, params, first, rng))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(steps), micro))
    return jax.tree.map(lambda x: x / steps, total)
  return fn


def make_train_step(runtime: Runtime):
  """The jitted `train_step(state, batch) -> (state, metrics)` of `runtime`; it donates `state`."""
  task, tx, schedule, nan_policy = runtime.task, runtime.tx, runtime.schedule, runtime.cfg.nan_policy
  grad_fn = accumulated_grads(task.loss_fn, runtime.cfg.get("grad_accum_steps", 1), runtime.mesh)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
    grads = optim.zero_frozen(runtime.cfg.optimizer, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return drop_nonfinite(state, new, metrics, nan_policy)

  replicated = NamedSharding(runtime.mesh, P())
  return jax.jit(train_step, in_shardings=(runtime.state_sharding, parallel.batch_sharding(runtime.mesh)),
                 out_shardings=(runtime.state_sharding, replicated), donate_argnums=(0,))


def drop_nonfinite(old: TrainState, new: TrainState, metrics: dict, policy: str):
  """NaN guard: a step whose loss or gradient norm is not finite keeps the old params and
  optimizer state, and reports `nonfinite` = 1. Under `skip` the step still advances (its batch
  is consumed, not retried); under `stop` it does not, so the state is the last good one."""
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  if policy == "skip":
    kept = kept.replace(step=new.step)
  return kept, {**metrics, "nonfinite": 1 - ok.astype(jnp.int32)}
