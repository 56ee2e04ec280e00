"""python -m vlm_jax.evaluate --workdir DIR [--step N] [--mesh M]

Restores a checkpoint of DIR (the latest, or step N) with the run's own config.json (on the run's
mesh where this host's devices can form it, else FSDP over them, or on --mesh), runs the
task's evaluators on `evals.splits`, prints the metrics and appends them to DIR/metrics.jsonl
under the same names training uses (`test/accuracy`, ...).
"""

import json
import os
import sys

import jax
from absl import flags

from vlm_jax import checkpoint, config as config_lib, logging as vlog, parallel, train
from vlm_jax.data.sources import DataInfo
from vlm_jax.errors import UserError, run_cli

FLAGS = flags.FLAGS


def load_run_config(workdir: str):
  """The run's resolved config, pinned to what its checkpoint needs: the workdir's tokenizer.json
  (a tokenizer re-derived from changed data could map ids to other words), no init_from."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' is not a training workdir: it has no config.json. "
                    f"Pass the --workdir of a `python -m vlm_jax.train` run.")
  with open(path) as f:
    cfg = config_lib.from_json(f.read())
  with cfg.unlocked():
    if os.path.exists(os.path.join(workdir, "tokenizer.json")):
      cfg.input.tokenizer = os.path.join(workdir, "tokenizer.json")
    cfg.init_from = ""
  return cfg


FALLBACK_MESH = "data=1,fsdp=-1,tensor=1"


def mesh_here(run_mesh: str, mesh: str = None) -> str:
  """The mesh to restore a run onto: `mesh` if given; else the run's own where this host's devices
  can form it; else FSDP over all of them. A run trained on a pod slice (say fsdp=256) can so be
  evaluated, predicted with or exported on a workstation, its parameters split over what is here."""
  if mesh:
    return mesh
  try:
    parallel.mesh_shape(run_mesh, jax.device_count())
    return run_mesh
  except UserError:
    if jax.process_index() == 0:
      print(f"note: the run's mesh '{run_mesh}' does not fit the {jax.device_count()} device(s) here; "
            f"restoring onto '{FALLBACK_MESH}' (choose another with --mesh).", file=sys.stderr, flush=True)
    return FALLBACK_MESH


def restore_run(workdir: str, step=None, edit=None, recorded_data: bool = True, mesh: str = None):
  """(Setup, params, step) of a training workdir at `step` (default: the latest checkpoint).

  The config is the run's own (`load_run_config`), changed by `edit(cfg)` if given, on `mesh_here`'s
  mesh; with `recorded_data` the dataset facts come from the workdir's data_info.json, so no
  dataset is needed.
  """
  workdir = checkpoint.local_dir(workdir, "--workdir")
  cfg = load_run_config(workdir)
  with cfg.unlocked():
    if edit:
      edit(cfg)
    cfg.mesh = mesh_here(cfg.mesh, mesh)
  info_path = os.path.join(workdir, "data_info.json")
  info = None
  if recorded_data and os.path.exists(info_path):
    with open(info_path) as f:
      info = DataInfo(**json.load(f))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = sorted(ckpt.manager.all_steps())
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in steps:
    ckpt.close()
    raise UserError(f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory} "
                    f"(steps: {steps or 'none'}); train first with `python -m vlm_jax.train`.")
  s = train.build(cfg, data_info=info)
  with s.context():
    params = ckpt.restore(step, s.abstract_state).params
  ckpt.close()
  return s, params, step


def evaluate_workdir(workdir: str, step=None, data_dir=None, mesh=None) -> dict:
  workdir = checkpoint.local_dir(workdir, "--workdir")

  def edit(cfg):
    cfg.data_dir = data_dir or cfg.data_dir
  s, params, step = restore_run(workdir, step, edit, recorded_data=False, mesh=mesh)
  results = train.evaluate(s, params, step, workdir)
  writer = vlog.MetricsWriter(workdir, enabled=jax.process_index() == 0)
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
