"""python -m vlm_jax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

One trainer for every task. The flow of a step reads top to bottom:
config -> data.pipeline (numpy batch per host) -> parallel.shard_batch (global jax.Array) ->
task.loss_fn inside the jitted `train_step` -> optax update -> checkpoint / logging / evals.
Running the same command again resumes from the latest checkpoint in DIR.

`build` and `make_train_step` need no TensorFlow: the input pipeline (tf.data) is imported where
batches are read, so the step also builds where TensorFlow is absent (`tools/benchmark.py` on a GPU
image without it).
"""

import dataclasses
import json
import os
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from vlm_jax import checkpoint, config as config_lib, flops, optim, parallel, preemption, tasks
from vlm_jax import logging as vlog
from vlm_jax.data import run_tokenizer, sources
from vlm_jax.errors import UserError, run_cli


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # the root key; step keys are fold_in(rng, step)


@dataclasses.dataclass
class Setup:
  """Everything built from a config that the train and evaluate loops share."""
  cfg: object
  mesh: jax.sharding.Mesh
  rules: tuple
  task: object
  tx: optax.GradientTransformation
  schedule: object
  state_sharding: TrainState
  abstract_state: TrainState
  init_state: object  # jitted rng -> TrainState
  host: sources.Host
  data_info: sources.DataInfo

  def context(self):
    """Mesh + logical-axis rules, needed while tracing and running the model."""
    return _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))


class _Both:
  def __init__(self, *cms):
    self.cms = cms

  def __enter__(self):
    for cm in self.cms:
      cm.__enter__()

  def __exit__(self, *exc):
    for cm in reversed(self.cms):
      cm.__exit__(*exc)


def open_data(cfg) -> sources.DataInfo:
  """Prepares the dataset (process 0 builds embedded datasets first) and returns its info."""
  if jax.process_index() == 0:
    builder = sources.open_source(cfg.input.data, cfg.data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
  if jax.process_index() != 0:
    builder = sources.open_source(cfg.input.data, cfg.data_dir)
  return sources.data_info(builder, cfg.input.label_key, [cfg.input.train_split, *cfg.evals.splits.split(",")])


def build(cfg, data_info=None, devices=None) -> Setup:
  config_lib.validate(cfg)
  mesh = parallel.make_mesh(cfg.mesh, devices)
  parallel.check_batch(cfg.batch_size, mesh)
  accum = cfg.get("grad_accum_steps", 1)
  if cfg.batch_size % accum:
    raise UserError(f"batch_size={cfg.batch_size} is not divisible by grad_accum_steps={accum}. Choose a divisor.")
  parallel.check_batch(cfg.batch_size // accum, mesh, "batch_size / grad_accum_steps")
  parallel.check_batch(cfg.evals.batch_size, mesh, "evals.batch_size")
  rules = parallel.RULES
  data_info = data_info or open_data(cfg)
  task = tasks.make(cfg, data_info)
  dummy = task.dummy_batch(parallel.data_shards(mesh))
  root = jax.random.PRNGKey(cfg.seed)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    try:
      boxed = jax.eval_shape(lambda r: task.init(r, dummy), root)
    except ValueError as e:  # the modules check their settings (heads vs width, pool, remat, ...)
      raise UserError(f"the model cannot be built from this config: {str(e).splitlines()[0]}. Fix the "
                      f"model.* value (--debug shows where it was raised).") from e
  param_specs = nn.get_partition_spec(boxed)
  params_abs = nn.meta.unbox(boxed)
  tx, schedule = optim.make(cfg.optimizer, cfg.total_steps, params_abs)

  def init_fn(rng):
    params = nn.meta.unbox(task.init(rng, dummy))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

  opt_specs = optim.state_specs(jax.eval_shape(tx.init, params_abs), params_abs, param_specs)
  logical = TrainState(step=P(), params=param_specs, opt_state=opt_specs, rng=P())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_fn, root)
  state_sharding = jax.tree.map(lambda x, sh: parallel.fit_sharding(x.shape, sh), abstract_state,
                                nn.logical_to_mesh_sharding(logical, mesh, rules))
  abstract_state = checkpoint.abstract_like(abstract_state, state_sharding)
  init_state = jax.jit(init_fn, out_shardings=state_sharding)
  host = sources.Host(jax.process_index(), jax.process_count())
  return Setup(cfg, mesh, rules, task, tx, schedule, state_sharding, abstract_state, init_state, host, data_info)


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


def make_train_step(s: Setup):
  task, tx, schedule, nan_policy = s.task, s.tx, s.schedule, s.cfg.nan_policy
  grad_fn = accumulated_grads(task.loss_fn, s.cfg.get("grad_accum_steps", 1), s.mesh)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = grad_fn(state.params, batch, rng)
    grads = optim.zero_frozen(s.cfg.optimizer, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return drop_nonfinite(state, new, metrics, nan_policy)

  replicated = NamedSharding(s.mesh, P())
  return jax.jit(train_step, in_shardings=(s.state_sharding, parallel.batch_sharding(s.mesh)),
                 out_shardings=(s.state_sharding, replicated), donate_argnums=(0,))


def drop_nonfinite(old: TrainState, new: TrainState, metrics: dict, policy: str):
  """NaN guard: a step whose loss or gradient norm is not finite keeps the old params and
  optimizer state, and reports `nonfinite` = 1. Under `skip` the step still advances (its batch
  is consumed, not retried); under `stop` it does not, so the state is the last good one."""
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  if policy == "skip":
    kept = kept.replace(step=new.step)
  return kept, {**metrics, "nonfinite": 1 - ok.astype(jnp.int32)}


def restore_or_init(s: Setup, ckpt: checkpoint.Checkpointer):
  with s.context():
    state, step = ckpt.restore_latest(s.abstract_state)
    if step is None:
      return s.init_state(jax.random.PRNGKey(s.cfg.seed)), False
    return state, True


def evaluate(s: Setup, params, step: int, workdir: str = None) -> dict:
  """Runs the task's evaluation on every split of `evals.splits`; returns {'SPLIT/METRIC': value}."""
  from vlm_jax.data import pipeline

  cfg, task = s.cfg, s.task
  local = cfg.evals.batch_size // s.host.count
  eval_step = jax.jit(task.eval_fn)
  predict = jax.jit(task.predict_fn)
  tok = getattr(task, "tokenizer", None)
  results = {}
  for split in [x.strip() for x in cfg.evals.splits.split(",") if x.strip()]:
    _, batches = pipeline.eval_batches(cfg.input, cfg.data_dir, split, local, s.host, tok)
    sums, records = None, []
    for i, batch in enumerate(batches):
      with s.context():
        gb = parallel.shard_batch(batch, s.mesh)
        out = eval_step(params, gb)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        picture = i == 0 and workdir and cfg.evals.pictures
        preds = predict(params, gb) if task.decodes or picture else None
      if task.decodes:
        fields = {k: gb[k] for k in (*task.text_fields, "_mask")}
        records += task.collect(*_gather(fields, preds))
      if picture:
        _draw(s, gb, preds, os.path.join(workdir, "pictures", f"{split}_{step:07d}.png"))
    for k, v in task.summarize(jax.device_get(sums), records).items():
      results[f"{split}/{k}"] = v
  return results


def _gather(*trees):
  """Global (sharded) arrays -> numpy on every process."""
  return [jax.tree.map(np.asarray, multihost_utils.process_allgather(t, tiled=True)) for t in trees]


def _draw(s: Setup, batch, preds, path):
  n = s.cfg.evals.pictures
  batch, preds = _gather(batch, preds)
  if jax.process_index() == 0:
    take = lambda t: jax.tree.map(lambda x: x[:n], t)
    items = s.task.draw(take(batch), take(preds))
    vlog.draw_grid(items, path, s.cfg.input.mean, s.cfg.input.std)


def _note_changed_input(workdir: str, cfg, start: int) -> None:
  """A resumed run whose batch size or seed differs from the run that saved the checkpoint is
  allowed (another slice, another per-device batch), but its input no longer continues where that
  run stopped: the position is step x batch_size, the order comes from the seed. Says so."""
  before = checkpoint.recorded_config(workdir)
  old_batch, old_seed = before.get("batch_size"), before.get("seed")
  if old_batch not in (None, cfg.batch_size):
    print(f"note: batch_size is {cfg.batch_size}, the run that saved step {start} used {old_batch}: the input "
          f"resumes at example {start * cfg.batch_size} of the shuffled stream, not at {start * old_batch} "
          f"where it stopped (the learning-rate schedule counts steps).", file=sys.stderr, flush=True)
  if old_seed not in (None, cfg.seed):
    print(f"note: seed is {cfg.seed}, the run that saved step {start} used {old_seed}: the input after "
          f"step {start} is shuffled and augmented in another order.", file=sys.stderr, flush=True)


def _trim_metrics(workdir: str, last_step: int) -> None:
  """Drops metrics logged after `last_step` (they are recomputed identically on resume), and a
  last line cut short by a killed run."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path) as f:
    text = f.read()
  lines = text.splitlines()
  if lines and not text.endswith("\n"):
    lines.pop()  # cut short by a kill; its step is recomputed
  keep = "".join(x + "\n" for x in lines if x.strip() and json.loads(x)["step"] <= last_step)
  if keep != text:
    with open(path + ".tmp", "w") as f:
      f.write(keep)
    os.replace(path + ".tmp", path)


def train(cfg, workdir: str, stop: preemption.StopSignal = None) -> dict:
  """Trains (or resumes) `cfg` in `workdir`; returns the last evaluation metrics.

  With `stop` (the CLI passes one), a SIGTERM/SIGINT ends the run after the current step with
  a committed checkpoint. A non-finite loss is skipped or stops the run (`nan_policy`). A second
  run started in the same workdir while this one trains is refused (`checkpoint.WorkdirLock`)."""
  parallel.initialize_distributed(cfg)
  workdir = checkpoint.local_dir(workdir, "--workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create workdir '{workdir}': {e.strerror}. Choose a writable --workdir.") from None
  checkpoint.check_writable(workdir, os.path.join(workdir, "checkpoints"))
  with checkpoint.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(cfg, workdir, stop)


def _train(cfg, workdir: str, stop) -> dict:
  from vlm_jax.data import pipeline

  lead = jax.process_index() == 0
  s = build(cfg)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  tok = getattr(s.task, "tokenizer", None)
  if tok is not None and ckpt.latest_step() is not None:
    run_tokenizer.check_same(tok, workdir, f"Resume with --config.input.tokenizer="
                             f"{workdir}/tokenizer.json, or use a new --workdir.")
  state, resumed = restore_or_init(s, ckpt)
  if cfg.init_from and not resumed:
    params, copied = checkpoint.load_params(cfg.init_from, state.params, cfg.init_include,
                                              cfg.init_prefix)
    state = state.replace(params=jax.device_put(params, s.state_sharding.params))
    print(f"Initialised {len(copied)} parameters from {cfg.init_from}", flush=True)
  if not resumed and hasattr(s.task, "load_pretrained"):
    params, copied = s.task.load_pretrained(jax.device_get(state.params))
    if copied:
      state = state.replace(params=jax.device_put(params, s.state_sharding.params))
      print(f"Initialised {len(copied)} parameters from the pretrained towers", flush=True)
  start = int(jax.device_get(state.step))
  if lead:
    if resumed:
      _note_changed_input(workdir, cfg, start)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
    with open(os.path.join(workdir, "data_info.json"), "w") as f:  # lets predict run without the dataset
      json.dump(dataclasses.asdict(s.data_info), f, indent=2)
    if getattr(s.task, "tokenizer", None) is not None:  # a checkpoint travels with its tokenizer
      s.task.tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    _trim_metrics(workdir, start)  # lines past the checkpoint (or all, without one) are recomputed
  writer = vlog.MetricsWriter(workdir, enabled=lead)
  if resumed:
    print(f"Resuming from {ckpt.directory}/{start}", flush=True)
  if start >= cfg.total_steps:
    print(f"Already trained to step {start} (total_steps={cfg.total_steps}); nothing to do.", flush=True)
    ckpt.close()
    return {}

  local_batch = cfg.batch_size // s.host.count
  text_stats = pipeline.TextStats()
  batches = pipeline.train_batches(cfg.input, cfg.data_dir, cfg.seed, local_batch, start, s.host,
                                   getattr(s.task, "tokenizer", None), text_stats, stop_step=cfg.total_steps)
  train_step = make_train_step(s)
  progress = vlog.Progress(cfg.total_steps, start, enabled=lead)
  example = s.task.dummy_batch(1)
  cost = (flops.train_flops(s.task.model, example, cfg.batch_size), flops.tokens_per_example(example), jax.device_count(),
          flops.peak_flops_per_device(cfg.get("peak_tflops", 0.0), dtype_mm=cfg.model.get("dtype_mm", "float32")))
  last_eval, t0, n0, skipped = {}, time.perf_counter(), start, 0
  for step in range(start + 1, cfg.total_steps + 1):
    with s.context():
      state, metrics = train_step(state, parallel.shard_batch(next(batches), s.mesh))
    skipped = skipped + metrics.pop("nonfinite")  # stays on device: no sync per step
    if cfg.nan_policy == "stop" and int(skipped):
      ckpt.save_now(step - 1, state)  # the update was dropped: `state` is the last good one
      raise UserError(f"step {step}: the loss or gradient norm is not finite (nan_policy='stop'); "
                      f"the last good state is saved as {ckpt.directory}/{step - 1}. Check the input "
                      f"data or lower optimizer.learning_rate; --config.nan_policy=skip drops such updates.")
    progress.update(1)
    if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics["skipped_steps"], skipped = int(skipped), 0  # updates dropped since the last line
      dt = time.perf_counter() - t0
      metrics["images_per_s"] = (step - n0) * cfg.batch_size / max(dt, 1e-9)
      metrics.update(flops.throughput(metrics["images_per_s"], *cost))
      if cfg.input.text:  # this process's texts cut to input.max_len since the last line
        metrics["texts_truncated"], text_stats.truncated = text_stats.truncated, 0
      t0, n0 = time.perf_counter(), step
      writer.write(step, {f"train/{k}": v for k, v in metrics.items()})
      progress.update(0, loss=metrics["loss"], img_s=round(metrics["images_per_s"], 1),
                      **({"mfu": round(metrics["mfu"], 3)} if "mfu" in metrics else {}))
    if step % cfg.eval_every_steps == 0 or step == cfg.total_steps:
      last_eval = evaluate(s, state.params, step, workdir)
      writer.write(step, last_eval)
      progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(last_eval.items())))
      t0 = time.perf_counter()  # evaluation time is not training throughput
    if step % cfg.checkpoint_every_steps == 0 or step == cfg.total_steps:
      ckpt.save(step, state)
    if stop is not None and step < cfg.total_steps and stop.requested(step):
      ckpt.save_now(step, state)
      print(f"Stopped by {stop.received} after step {step}: checkpoint {ckpt.directory}/{step} is saved; "
            f"run the same command to resume.", flush=True)
      break
  progress.close()
  ckpt.close()
  writer.close()
  return last_eval


FLAGS = flags.FLAGS


def main(argv=None):
  argv = sys.argv if argv is None else argv
  config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/vit_shapes.py[:ARG].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
  flags.mark_flags_as_required(["config", "workdir"])

  def run():
    with preemption.StopSignal() as stop:
      config_lib.parse_argv(FLAGS, argv)
      train(FLAGS.config, FLAGS.workdir, stop)
  sys.exit(run_cli(run, argv))


if __name__ == "__main__":
  main()
