"""First-run check: build the embedded dataset from nothing N times, each in a fresh data_dir.

python tools/build_repeat.py [--n 20] [--dataset shapes] [--timeout 900] [--keep]

Each trial is a subprocess that first starts JAX and TensorFlow threads (as the trainer has when
it builds the data), then builds the dataset through `sources.open_source` into a new empty
data_dir, under a wall-clock timeout. Prints one line per trial (completed / failed / timed out,
with the seconds) and `completed K/N`; exits 0 only when all completed. Data_dirs are removed
after each trial unless --keep.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the trainer has done before it opens its data: JAX and TensorFlow threads are running.
CHILD = """
import sys
import jax.numpy as jnp
import tensorflow as tf
jnp.ones(8).sum().block_until_ready()
tf.reduce_sum(tf.ones(8)).numpy()
from vlm_jax.data import sources
from vlm_jax.errors import UserError
try:
  b = sources.open_source(sys.argv[1], sys.argv[2])
except UserError as e:
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)
print("examples", sum(s.num_examples for s in b.info.splits.values()))
"""


def trial(dataset: str, data_dir: str, timeout_s: float):
  """(outcome, seconds, last stderr line) of one build into data_dir."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  start = time.monotonic()
  proc = subprocess.Popen([sys.executable, "-c", CHILD, dataset, data_dir], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, 9)  # the build subprocess and its render workers too
    proc.communicate()
    return "timed out", time.monotonic() - start, ""
  seconds = time.monotonic() - start
  last = (err.strip().splitlines() or [""])[-1]
  if proc.returncode == 0 and out.startswith("examples"):
    return "completed", seconds, out.strip()
  return f"failed (exit {proc.returncode})", seconds, last


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=20)
  parser.add_argument("--dataset", default="shapes", help="the quickstart's dataset by default")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per build")
  parser.add_argument("--keep", action="store_true", help="keep each trial's data_dir")
  args = parser.parse_args()
  completed = 0
  for i in range(1, args.n + 1):
    data_dir = tempfile.mkdtemp(prefix="build_repeat_")
    outcome, seconds, detail = trial(args.dataset, data_dir, args.timeout)
    completed += outcome == "completed"
    print(f"trial {i}/{args.n}: {outcome} in {seconds:.0f} s  {detail}  [{data_dir}]", flush=True)
    if not args.keep:
      shutil.rmtree(data_dir, ignore_errors=True)
  print(f"completed {completed}/{args.n} builds of '{args.dataset}' from an empty data_dir "
        f"(timeout {args.timeout:g} s each)", flush=True)
  return 0 if completed == args.n else 1


if __name__ == "__main__":
  sys.exit(main())
