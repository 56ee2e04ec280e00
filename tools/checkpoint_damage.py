"""Which damage to a committed checkpoint does restore notice? One file at a time, truncated or deleted.

python tools/checkpoint_damage.py --workdir DIR [--step N]

For every file of step N (default: the latest) of DIR/checkpoints, and for each of "truncate to
half" and "delete", copies the checkpoint directory, damages that one file, and restores the copy
as `vlm_jax.checkpoint` does. Each case ends as `error` (restore raises: `restore_latest` falls
back to an older step), `same` (the file was not needed; the restored tree equals the original)
or `WRONG` (restore returned different values without an error, the case that must not occur).
Each error is also sorted as `restore_latest` sorts it (`checkpoint._verdict`): damaged (set aside),
transient (retried) or unknown (stops the run); every real damage should come out damaged.
Prints one line per case and the counts.
"""

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--step", type=int, default=None)
  args = ap.parse_args()
  import absl.logging
  import jax

  from vlm_jax import checkpoint

  absl.logging.set_verbosity("error")
  src = os.path.join(os.path.abspath(args.workdir), "checkpoints")
  ckpt = checkpoint.Checkpointer(src, async_save=False)
  step = args.step if args.step is not None else ckpt.latest_step()
  original = jax.tree.leaves(ckpt.restore_host(step))
  ckpt.close()
  step_dir = os.path.join(src, str(step))
  files = sorted(os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir) for f in fs)
  counts = {"error": 0, "same": 0, "WRONG": 0}
  kinds = {checkpoint.DAMAGED: "damaged", checkpoint.TRANSIENT: "transient", checkpoint.UNKNOWN: "unknown"}
  verdicts = dict.fromkeys(kinds.values(), 0)
  with tempfile.TemporaryDirectory() as tmp:
    for name in files:
      for how in ("truncate", "delete"):
        copy = os.path.join(tmp, "checkpoints")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(step_dir, os.path.join(copy, str(step)))
        path = os.path.join(copy, str(step), name)
        if how == "delete":
          os.remove(path)
        else:
          os.truncate(path, os.path.getsize(path) // 2)
        damaged = checkpoint.Checkpointer(copy, async_save=False)
        try:
          leaves = jax.tree.leaves(damaged.restore_host(step))
          same = len(leaves) == len(original) and all(np.array_equal(a, b) for a, b in zip(leaves, original))
          result, detail = ("same", "") if same else ("WRONG", "")
        except Exception as e:  # what restore_latest catches
          kind = kinds[checkpoint._verdict(e)]
          verdicts[kind] += 1
          result, detail = "error", f"{kind:9s} {checkpoint._reason(e)[:90]}"
        damaged.manager.close()
        counts[result] += 1
        print(f"{how:8s} {name:70s} {result:5s} {detail}", flush=True)
  print(f"{len(files)} files x 2 damages: {counts['error']} detected (error), {counts['same']} harmless "
        f"(restored exactly), {counts['WRONG']} silently wrong; errors sorted as "
        + ", ".join(f"{n} {k}" for k, n in verdicts.items()))
  sys.exit(1 if counts["WRONG"] or verdicts["damaged"] != counts["error"] else 0)


if __name__ == "__main__":
  main()
