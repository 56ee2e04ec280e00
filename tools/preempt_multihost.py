"""Preemption agreement across processes: two `python -m vlm_jax.train` processes (4 CPU devices
each, jax.distributed on localhost) train the tiny recipe; one of them gets a signal.

python tools/preempt_multihost.py --data_dir DIR [--signal SIGTERM|SIGINT] [--to 0|1] [--root DIR]

Both must exit 0 after the same step with the one-line message, and that step must be the one
committed checkpoint. Prints the outcome; exit status 1 when it does not hold.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data_dir", required=True, help="tfds data_dir holding shapes/tiny")
  ap.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGINT"])
  ap.add_argument("--to", type=int, default=1, choices=[0, 1], help="which process gets the signal")
  ap.add_argument("--root", default="/tmp/vlm_jax_preempt_multihost")
  ap.add_argument("--port", type=int, default=23456)
  args = ap.parse_args()
  wd = os.path.join(args.root, "run")
  if os.path.exists(wd):
    sys.exit(f"error: {wd} exists; choose a new --root.")
  os.makedirs(args.root, exist_ok=True)
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/vit_shapes.py:tiny", "--workdir", wd,
           f"--config.data_dir={args.data_dir}", "--config.total_steps=60", "--config.checkpoint_every_steps=100",
           "--config.log_every_steps=1", "--config.eval_every_steps=1000", "--config.evals.splits=",
           "--config.distributed.enable=true", f"--config.distributed.coordinator_address=localhost:{args.port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    log = open(os.path.join(args.root, f"process{i}.txt"), "w")
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

  def logged():
    try:
      with open(os.path.join(wd, "metrics.jsonl")) as f:
        return max([json.loads(x)["step"] for x in f.read().split("\n")[:-1]] or [0])
    except OSError:
      return 0
  end = time.monotonic() + 600
  while logged() < 5 and time.monotonic() < end and all(p.poll() is None for p in procs):
    time.sleep(0.01)
  sent_after = logged()
  procs[args.to].send_signal(getattr(signal, args.signal))
  codes = [p.wait(timeout=300) for p in procs]
  stops = []
  for i in range(2):
    with open(os.path.join(args.root, f"process{i}.txt")) as f:
      m = re.search(r"Stopped by (\S+) after step (\d+): checkpoint", f.read())
    stops.append(int(m.group(2)) if m else None)
  committed = sorted(n for n in os.listdir(os.path.join(wd, "checkpoints")))
  ok = codes == [0, 0] and stops[0] is not None and stops[0] == stops[1] and committed == [str(stops[0])]
  print(f"{args.signal} to process {args.to} after step {sent_after}: exit codes {codes}, stopped after steps "
        f"{stops}, checkpoints {committed}: {'OK' if ok else 'FAIL'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
