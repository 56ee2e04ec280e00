"""Multi-host training on one machine: 2 processes x 4 CPU devices through the real CLI (jax.distributed,
gloo collectives), checkpoint, resume, and the same losses as one process driving 8 devices.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlm_jax import config, flops, parallel, reporting
from vlm_jax.data import pipeline, sources
from vlm_jax.runtime import build
from vlm_jax.step import make_train_step

from conftest import REPO

STEPS = 4
# A constant schedule, so that the first run (total_steps=2) and the resumed one (4) share learning rates.
OVERRIDES = ["--config.mesh=data=-1", "--config.log_every_steps=1", "--config.eval_every_steps=1000",
             "--config.checkpoint_every_steps=2", "--config.evals.splits=", "--config.optimizer.schedule=constant",
             "--config.optimizer.warmup_steps=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, data_dir, total_steps):
  port = _free_port()
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "vlm_jax.train", "--config", os.path.join(REPO, "configs/vit_shapes.py:tiny"),
       "--workdir", str(workdir), f"--config.data_dir={data_dir}", f"--config.total_steps={total_steps}",
       *OVERRIDES, "--config.distributed.enable=true", f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=400)[0])
  finally:
    for p in procs:  # a process whose peer died waits for the coordinator: never leave it behind
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _reference_losses(data_dir):
  """One process, 8 devices, fed the global batches the two processes assemble (host 0's rows first)."""
  cfg = config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny"))
  cfg.data_dir, cfg.mesh, cfg.total_steps = data_dir, "data=-1", STEPS
  cfg.optimizer.schedule, cfg.optimizer.warmup_steps = "constant", 1
  s = build(cfg, devices=jax.devices()[:8])
  hosts = [pipeline.train_batches(cfg.input, data_dir, cfg.seed, cfg.batch_size // 2, 0, sources.Host(i, 2))
           for i in range(2)]
  step = make_train_step(s)
  losses = []
  with s.context():
    state = s.init_state(jax.random.PRNGKey(cfg.seed))
    for _ in range(STEPS):
      parts = [next(h) for h in hosts]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      state, metrics = step(state, parallel.shard_batch(batch, s.mesh))
      losses.append(float(metrics["loss"]))
  return losses


def test_two_processes_train_checkpoint_resume_match_one_process(data_dir, tmp_path):
  wd = tmp_path / "run"
  _run_two_processes(wd, data_dir, STEPS // 2)  # stops after its step-2 checkpoint
  assert sorted(os.listdir(wd / "checkpoints")) == ["2"]
  outputs = _run_two_processes(wd, data_dir, STEPS)  # both processes restore step 2 and continue
  assert "Resuming from" in outputs[0]
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
  rows = [r for r in reporting.read_metrics(str(wd)) if "train/loss" in r]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # written once, by process 0
  # Model FLOPs per second follow from the measured images/s and the model's FLOPs per image, spread
  # over all 8 devices of both processes; MFU divides that by one peak.
  cfg = config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny"))
  cfg.data_dir = data_dir
  task = build(cfg, devices=jax.devices()[:8]).task
  per_image = flops.train_flops(task.flops(task.dummy_batch(1), cfg.batch_size))
  timed = [r for r in rows if "train/images_per_s" in r]
  assert timed and per_image > 0
  for r in timed:
    assert r["train/tflops_per_device"] == pytest.approx(r["train/images_per_s"] * per_image / 8 / 1e12, rel=1e-6)
  # Each run measures the CPU's peak once: steps 1-2 share one, the resumed steps 3-4 another.
  peaks = {r["step"]: r["train/tflops_per_device"] / r["train/mfu"] for r in timed}
  assert sorted(peaks) == [1, 2, 3, 4]
  assert peaks[2] == pytest.approx(peaks[1], rel=1e-6) and peaks[4] == pytest.approx(peaks[3], rel=1e-6)
  np.testing.assert_allclose([r["train/loss"] for r in rows], _reference_losses(data_dir), atol=1e-5, rtol=0)
