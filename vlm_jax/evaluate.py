"""Evaluation: the loop over `evals.splits` that the trainer calls, and its CLI.

`evaluate(runtime, params, step)` runs the task's evaluators on every split and returns the
metrics named `SPLIT/METRIC` (`test/accuracy`, ...); tasks whose metrics need every example
(`collects_predictions`) have their predictions gathered to the host.

python -m vlm_jax.evaluate --workdir DIR [--step N] [--mesh M]
restores a checkpoint of DIR (the latest, or step N) with the run's own config.json (on the run's
mesh where this host's devices can form it, else FSDP over them, or on --mesh), runs the
task's evaluators on `evals.splits`, prints the metrics and appends them to DIR/metrics.jsonl
under the same names training uses (`test/accuracy`, ...).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from vlm_jax import config as config_lib, parallel, reporting, workdir as workdir_lib
from vlm_jax.data import pipeline
from vlm_jax.errors import run_cli
from vlm_jax.runtime import FALLBACK_MESH, Runtime, restore_run

FLAGS = flags.FLAGS


def evaluate(runtime: Runtime, params, step: int, workdir: str = None) -> dict:
  """Runs the task's evaluation on every split of `evals.splits`; returns {'SPLIT/METRIC': value}.
  With `workdir`, the first batch's predictions are drawn to WORKDIR/pictures/SPLIT_STEP.png."""
  cfg, task = runtime.cfg, runtime.task
  local = cfg.evals.batch_size // runtime.host.count
  eval_step = jax.jit(task.eval_fn)
  predict = jax.jit(task.predict_fn)
  results = {}
  for split in [x.strip() for x in cfg.evals.splits.split(",") if x.strip()]:
    _, batches = pipeline.eval_batches(cfg.input, cfg.data_dir, split, local, runtime.host,
                                       task.features(cfg.input), task.encode)
    sums, records = None, []
    for i, batch in enumerate(batches):
      with runtime.context():
        gb = parallel.shard_batch(batch, runtime.mesh)
        out = eval_step(params, gb)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        picture = i == 0 and workdir and cfg.evals.pictures
        preds = predict(params, gb) if task.collects_predictions or picture else None
      if task.collects_predictions:
        fields = {k: gb[k] for k in (*task.text_fields, "_mask")}
        records += task.collect(*_gather(fields, preds))
      if picture:
        _draw(runtime, gb, preds, os.path.join(workdir, "pictures", f"{split}_{step:07d}.png"))
    for k, v in task.summarize(jax.device_get(sums), records).items():
      results[f"{split}/{k}"] = v
  return results


def _gather(*trees):
  """Global (sharded) arrays -> numpy on every process."""
  return [jax.tree.map(np.asarray, multihost_utils.process_allgather(t, tiled=True)) for t in trees]


def _draw(runtime: Runtime, batch, preds, path):
  n = runtime.cfg.evals.pictures
  batch, preds = _gather(batch, preds)
  if jax.process_index() == 0:
    take = lambda t: jax.tree.map(lambda x: x[:n], t)
    items = runtime.task.draw(take(batch), take(preds))
    reporting.draw_grid(items, path, runtime.cfg.input.mean, runtime.cfg.input.std)


def evaluate_workdir(workdir: str, step=None, data_dir=None, mesh=None) -> dict:
  """Evaluates checkpoint `step` (default: the latest) of `workdir`; prints the metrics and appends
  them to its metrics.jsonl."""
  workdir = workdir_lib.local_dir(workdir, "--workdir")

  def edit(cfg):
    cfg.data_dir = data_dir or cfg.data_dir
  runtime, params, step = restore_run(workdir, step, edit, recorded_data=False, mesh=mesh)
  results = evaluate(runtime, params, step, workdir)
  writer = reporting.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(step, results)
  writer.close()
  for k, v in sorted(results.items()):
    print(f"{k}\t{v:.6g}")
  return results


def main(argv=None):
  argv = sys.argv if argv is None else argv
  flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_string("data_dir", None, "Override the run's tfds data_dir.")
  flags.DEFINE_string("mesh", None, "Mesh to evaluate on (default: the run's where it fits, else "
                      f"{FALLBACK_MESH}).")
  flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
  flags.mark_flags_as_required(["workdir"])

  def run():
    config_lib.parse_argv(FLAGS, argv)
    evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.data_dir, FLAGS.mesh)
  sys.exit(run_cli(run, argv))


if __name__ == "__main__":
  main()
