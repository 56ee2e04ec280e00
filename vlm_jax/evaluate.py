"""python -m vlm_jax.evaluate --workdir DIR [--step N]

Restores a checkpoint of DIR (the latest, or step N) with the run's own config.json, runs the
task's evaluators on `evals.splits`, prints the metrics and appends them to DIR/metrics.jsonl
under the same names training uses (`test/accuracy`, ...).
"""

import os
import sys

import jax
from absl import flags

from vlm_jax import checkpoint, config as config_lib, logging as vlog, train
from vlm_jax.errors import UserError, run_cli

FLAGS = flags.FLAGS


def load_run_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' is not a training workdir: it has no config.json. "
                    f"Pass the --workdir of a `python -m vlm_jax.train` run.")
  with open(path) as f:
    return config_lib.from_json(f.read())


def evaluate_workdir(workdir: str, step=None, data_dir=None) -> dict:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  cfg = load_run_config(workdir)
  if data_dir:
    with cfg.unlocked():
      cfg.data_dir = data_dir
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.manager.all_steps():
    raise UserError(f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory}; "
                    f"available steps: {sorted(ckpt.manager.all_steps()) or 'none'}.")
  s = train.build(cfg)
  with s.context():
    state = ckpt.restore(step, s.abstract_state)
  ckpt.close()
  results = train.evaluate(s, state.params, step, workdir)
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
  flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
  flags.mark_flags_as_required(["workdir"])

  def run():
    config_lib.parse_argv(FLAGS, argv)
    evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.data_dir)
  sys.exit(run_cli(run, argv))


if __name__ == "__main__":
  main()
