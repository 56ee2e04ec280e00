"""A run's log holds what a user should read: no deprecation warnings from the libraries we call."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_captioning_run_logs_no_deprecation_or_tfds_noise(data_dir, tmp_path):
  d = str(tmp_path / "tfds")
  shutil.copytree(data_dir, d)  # a fresh tokenizer cache: the tokenizer is trained in this run
  cmd = [sys.executable, "-m", "vlm_jax.train", "--config", "configs/cappa_shapes.py:tiny",
         "--workdir", str(tmp_path / "run"), f"--config.data_dir={d}", "--config.total_steps=2",
         "--config.evals.splits=", "--config.checkpoint_every_steps=2"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.exists(tmp_path / "run" / "tokenizer.json")
  log = proc.stdout + proc.stderr
  assert [line for line in log.splitlines() if "is deprecated" in line] == []
  assert "Variant folder" not in log
