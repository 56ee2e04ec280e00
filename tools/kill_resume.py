"""Exact-resume check: SIGKILL a real training run at random points, re-run it, compare bitwise.

python tools/kill_resume.py --data_dir DIR [--trials 20] [--seed 0] [--out results.json]

Runs `python -m vlm_jax.train` on the tiny recipe (configs/vit_shapes.py:tiny, checkpoint every
step, keep 1) once uninterrupted, then per trial: starts the same command, kills it with
SIGKILL at a seeded random step (or, at random, at the first moment after it that an async save
is in flight), re-runs the command until it finishes, and checks that
  * the final TrainState (params, optimizer state, step, RNG) equals the uninterrupted run's bitwise,
  * metrics.jsonl has each train step exactly once and equals the uninterrupted log
    (wall-clock throughput aside),
  * the re-run resumed from the newest checkpoint committed when the kill landed (so keep-N
    never deleted the last good one for an unconfirmed save).
A trial kills the run once or twice (each re-run is killed again at a later step). Prints one
line per trial and a summary; tests/test_reliability_resume.py runs two short trials (with a
SIGTERM in one) through the same functions.
Subprocesses share a persistent XLA compilation cache, so only the first one compiles.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "configs/vit_shapes.py:tiny"
TOTAL_STEPS = 12
SETTINGS = (f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every_steps=1",
            "--config.keep_checkpoints=1", "--config.log_every_steps=1", "--config.eval_every_steps=1000",
            "--config.evals.splits=")
TMP = ".orbax-checkpoint-tmp"


def environment(cache_dir: str) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def launch(workdir: str, data_dir: str, cache_dir: str, log_name: str, *extra) -> subprocess.Popen:
  """Starts the training command; its stdout+stderr go to WORKDIR/../LOG_NAME."""
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  log = open(os.path.join(os.path.dirname(workdir), log_name), "w")
  cmd = [sys.executable, "-m", "vlm_jax.train", "--config", RECIPE, "--workdir", workdir,
         f"--config.data_dir={data_dir}", *SETTINGS, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=environment(cache_dir), stdout=log, stderr=subprocess.STDOUT)


def output(workdir: str, log_name: str) -> str:
  with open(os.path.join(os.path.dirname(workdir), log_name)) as f:
    return f.read()


def last_logged_step(workdir: str) -> int:
  """The last train step in metrics.jsonl (0 without one; a half-written line is ignored)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().split("\n")[:-1]
  except OSError:
    return 0
  return max([json.loads(x)["step"] for x in lines if "train/loss" in x] or [0])


def checkpoint_dirs(workdir: str) -> tuple[list, list]:
  """(committed steps, unfinished saves) in WORKDIR/checkpoints."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except OSError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if n.endswith(TMP))


def final_state(workdir: str) -> dict:
  from vlm_jax import checkpoint
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  state = ckpt.restore_host(TOTAL_STEPS)
  ckpt.close()
  return state


def metric_rows(workdir: str) -> list:
  from vlm_jax import reporting
  return reporting.read_metrics(workdir, clock=False)


def reference_run(root: str, data_dir: str, cache_dir: str) -> dict:
  """The uninterrupted run: {'state': numpy tree, 'metrics': rows}."""
  wd = os.path.join(root, "reference", "run")
  proc = launch(wd, data_dir, cache_dir, "log.txt")
  if proc.wait(timeout=600) != 0:
    raise RuntimeError("reference run failed:\n" + output(wd, "log.txt")[-3000:])
  return {"state": final_state(wd), "metrics": metric_rows(wd)}


def differences(a, b) -> list:
  import jax
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  if [p for p, _ in fa] != [p for p, _ in fb]:
    return ["the saved trees differ in structure"]
  return [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(fa, fb) if not np.array_equal(x, y)]


def interrupt(wd: str, log_name: str, data_dir: str, cache_dir: str, sig: str, kill_step: int,
              during_save: bool) -> dict:
  """Starts the run and sends `sig` once step `kill_step` is logged (and, with `during_save`, an
  async save is in flight). SIGKILL: waits for the death. SIGTERM/SIGINT: expects exit status 0,
  the one-line message and a committed checkpoint of the step it names."""
  rec = {"signal": sig, "after_step": kill_step, "during_save": during_save, "problems": []}
  proc = launch(wd, data_dir, cache_dir, log_name)
  ready = lambda: last_logged_step(wd) >= kill_step and (not during_save or checkpoint_dirs(wd)[1])
  end = time.monotonic() + 300
  while proc.poll() is None and not ready() and time.monotonic() < end:
    time.sleep(0.002)
  if proc.poll() is not None:
    rec["problems"].append(f"the run ended (status {proc.returncode}) before the {sig}")
  else:
    if not ready():
      rec["problems"].append(f"step {kill_step} was not reached within 300 s")
    proc.send_signal(getattr(signal, sig))
  rc = proc.wait(timeout=300)
  rec["committed"], rec["unfinished"] = checkpoint_dirs(wd)
  rec["logged"] = last_logged_step(wd)
  if sig != "SIGKILL" and not rec["problems"]:
    text = output(wd, log_name)
    m = re.search(rf"Stopped by {sig} after step (\d+): checkpoint .*/(\d+) is saved; run the same command "
                  rf"to resume\.", text)
    if rc != 0 or not m:
      rec["problems"].append(f"{sig}: exit status {rc}, output ends {text[-1500:]!r}")
    elif int(m.group(1)) not in rec["committed"] or rec["unfinished"]:
      rec["problems"].append(f"{sig}: stopped at step {m.group(1)} but committed {rec['committed']}, "
                             f"unfinished {rec['unfinished']}")
    else:
      rec["stopped_at"] = int(m.group(1))
  return rec


def run_trial(root: str, index: int, rng: np.random.Generator, data_dir: str, cache_dir: str,
              reference: dict, events) -> dict:
  """Interrupts the run once per (signal, during_save) in `events`, each at a random step after
  the last one, then re-runs it to the end; `problems` lists every way it differs from `reference`."""
  wd = os.path.join(root, f"trial{index:02d}", "run")
  rec = {"trial": index, "events": [], "problems": []}
  for i, (sig, during_save) in enumerate(events):
    first = max([e["logged"] for e in rec["events"]] or [0]) + 1
    if first >= TOTAL_STEPS:
      break
    ev = interrupt(wd, f"run{i}.txt", data_dir, cache_dir, sig, int(rng.integers(first, TOTAL_STEPS)), during_save)
    rec["events"].append(ev)
    rec["problems"] += ev["problems"]
  log_name = f"run{len(rec['events'])}.txt"
  proc = launch(wd, data_dir, cache_dir, log_name)
  rc = proc.wait(timeout=600)
  text = output(wd, log_name)
  if rc != 0:
    rec["problems"].append(f"the final re-run exited {rc}: {text[-1500:]}")
    return rec
  committed = rec["events"][-1]["committed"] if rec["events"] else []
  m = re.search(r"Resuming from .*/(\d+)\n", text)
  rec["resumed_from"] = int(m.group(1)) if m else 0
  if rec["resumed_from"] != max(committed or [0]):
    rec["problems"].append(f"resumed from step {rec['resumed_from']}, but step {max(committed or [0])} was committed")
  diff = differences(final_state(wd), reference["state"])
  if diff:
    rec["problems"].append(f"final state differs from the uninterrupted run in {diff[:3]}")
  rows = metric_rows(wd)
  steps = [r["step"] for r in rows if "train/loss" in r]
  if steps != list(range(1, TOTAL_STEPS + 1)):
    rec["problems"].append(f"metrics.jsonl train steps are {steps}")
  elif rows != reference["metrics"]:
    rec["problems"].append("metrics.jsonl values differ from the uninterrupted run")
  return rec


def describe(rec: dict) -> str:
  parts = [f"{e['signal']}{' in a save' if e['during_save'] else ''} after step {e['after_step']} "
           f"(logged {e['logged']}, committed {e['committed']}{', unfinished save' if e['unfinished'] else ''})"
           for e in rec["events"]]
  verdict = "OK" if not rec["problems"] else "FAIL " + "; ".join(rec["problems"])
  return f"trial {rec['trial']:2d}: {' -> '.join(parts)} -> resumed from {rec.get('resumed_from')}: {verdict}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data_dir", required=True, help="tfds data_dir; shapes/tiny is built there if missing")
  ap.add_argument("--trials", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default="/tmp/vlm_jax_kill_resume", help="workdirs of the runs")
  ap.add_argument("--out", default="", help="write the trial records as JSON here")
  args = ap.parse_args()
  sys.path.insert(0, REPO)
  import jax
  jax.config.update("jax_platforms", "cpu")
  from vlm_jax.data.builders import shapes
  shapes.prepare("shapes/tiny", args.data_dir)
  if os.path.exists(args.root) and os.listdir(args.root):
    sys.exit(f"error: --root {args.root} is not empty; choose a new directory.")
  cache = os.path.join(args.root, "xla_cache")
  t0 = time.time()
  reference = reference_run(args.root, args.data_dir, cache)
  rng = np.random.default_rng(args.seed)
  records = []
  for i in range(args.trials):
    events = [("SIGKILL", bool(rng.integers(2))) for _ in range(int(rng.integers(1, 3)))]
    records.append(run_trial(args.root, i, rng, args.data_dir, cache, reference, events))
    print(describe(records[-1]), flush=True)
  ok = sum(not r["problems"] for r in records)
  kills = [e for r in records for e in r["events"]]
  in_save = sum(bool(e["unfinished"]) for e in kills)
  print(f"{ok}/{len(records)} trials resumed exactly (bitwise state, metrics without gaps or duplicates) "
        f"after {len(kills)} SIGKILLs, {in_save} of which left an unfinished async save; {time.time() - t0:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(records, f, indent=1)
  sys.exit(0 if ok == len(records) else 1)


if __name__ == "__main__":
  main()
