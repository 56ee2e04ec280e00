"""python -m vlm_jax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

The training loop, one for every task. The flow of a step reads top to bottom:
config -> data.pipeline (numpy batch per host) -> parallel.shard_batch (global jax.Array) ->
the jitted `step.make_train_step` (task.loss_fn, optax update) -> checkpoint / reporting / evals.
Running the same command again resumes from the latest checkpoint in DIR.

A run's parts are built by `runtime.build` and `step.make_train_step`, shared with evaluation,
prediction, the Hugging Face export and the compile and benchmark tools.
"""

import os
import sys
import time

import jax
from absl import flags
from ml_collections import config_flags

from vlm_jax import checkpoint, config as config_lib, flops, init, parallel, preemption, reporting
from vlm_jax import workdir as workdir_lib
from vlm_jax.data import pipeline, tokenizer_source
from vlm_jax.errors import UserError, run_cli
from vlm_jax.evaluate import evaluate
from vlm_jax.runtime import Runtime, build
from vlm_jax.step import make_train_step


def restore_or_init(runtime: Runtime, ckpt: checkpoint.Checkpointer):
  """(state, resumed): the latest checkpoint that restores, or a fresh state from the config's seed."""
  with runtime.context():
    state, step = ckpt.restore_latest(runtime.abstract_state)
    if step is None:
      return runtime.init_state(jax.random.PRNGKey(runtime.cfg.seed)), False
    return state, True


def train(cfg, workdir: str, stop: preemption.StopSignal = None) -> dict:
  """Trains (or resumes) `cfg` in `workdir`; returns the last evaluation metrics.

  With `stop` (the CLI passes one), a SIGTERM/SIGINT ends the run after the current step with
  a committed checkpoint. A non-finite loss is skipped or stops the run (`nan_policy`). A second
  run started in the same workdir while this one trains is refused (`workdir.WorkdirLock`)."""
  parallel.initialize_distributed(cfg)
  workdir = workdir_lib.create(workdir)
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train(cfg, workdir, stop)


def _train(cfg, workdir: str, stop) -> dict:
  lead = jax.process_index() == 0
  runtime = build(cfg)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  task = runtime.task
  tok = task.tokenizer
  if tok is not None and ckpt.latest_step() is not None:
    tokenizer_source.check_same(tok, workdir, f"Resume with --config.input.tokenizer="
                             f"{workdir}/tokenizer.json, or use a new --workdir.")
  state, resumed = restore_or_init(runtime, ckpt)
  if cfg.init_from and not resumed:
    params, copied = init.load_params(cfg.init_from, state.params, cfg.init_include, cfg.init_prefix)
    state = state.replace(params=jax.device_put(params, runtime.state_sharding.params))
    print(f"Initialised {len(copied)} parameters from {cfg.init_from}", flush=True)
  if not resumed:
    params, copied = task.load_pretrained(jax.device_get(state.params))
    if copied:
      state = state.replace(params=jax.device_put(params, runtime.state_sharding.params))
      print(f"Initialised {len(copied)} parameters from the pretrained towers", flush=True)
  start = int(jax.device_get(state.step))
  if lead:
    if resumed:
      workdir_lib.note_changed_input(workdir, cfg, start)
    workdir_lib.write_run_files(workdir, cfg, runtime.data_info, tok)
    workdir_lib.trim_metrics(workdir, start)  # lines past the checkpoint (or all, without one) are recomputed
  writer = reporting.MetricsWriter(workdir, enabled=lead)
  if resumed:
    print(f"Resuming from {ckpt.directory}/{start}", flush=True)
  if start >= cfg.total_steps:
    print(f"Already trained to step {start} (total_steps={cfg.total_steps}); nothing to do.", flush=True)
    ckpt.close()
    return {}

  local_batch = cfg.batch_size // runtime.host.count
  text_stats = pipeline.TextStats()
  batches = pipeline.train_batches(cfg.input, cfg.data_dir, cfg.seed, local_batch, start, runtime.host,
                                   task.features(cfg.input), task.encode, text_stats, stop_step=cfg.total_steps)
  train_step = make_train_step(runtime)
  progress = reporting.Progress(cfg.total_steps, start, enabled=lead)
  example = task.dummy_batch(1)
  cost = flops.StepCost(
      flops.train_flops(task.flops(example, cfg.batch_size)), flops.tokens_per_example(example), jax.device_count(),
      flops.peak_flops_per_device(cfg.get("peak_tflops", 0.0), dtype_mm=cfg.model.get("dtype_mm", "float32")))
  last_eval, t0, n0, skipped = {}, time.perf_counter(), start, 0
  for step in range(start + 1, cfg.total_steps + 1):
    with runtime.context():
      state, metrics = train_step(state, parallel.shard_batch(next(batches), runtime.mesh))
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
      metrics.update(flops.throughput(metrics["images_per_s"], cost))
      if tok is not None:  # this process's texts cut to input.max_len since the last line
        metrics["texts_truncated"], text_stats.truncated = text_stats.truncated, 0
      t0, n0 = time.perf_counter(), step
      writer.write(step, {f"train/{k}": v for k, v in metrics.items()})
      progress.update(0, loss=metrics["loss"], img_s=round(metrics["images_per_s"], 1),
                      **({"mfu": round(metrics["mfu"], 3)} if "mfu" in metrics else {}))
    if step % cfg.eval_every_steps == 0 or step == cfg.total_steps:
      last_eval = evaluate(runtime, state.params, step, workdir)
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
