"""tools/benchmark.py at toy size: the train-step benchmark (bf16 matmuls) prints its JSON line with
the published fields, --profile reports where the step's time goes by XLA op kind, and it runs
where TensorFlow cannot be imported (GPU images without it); the compile benchmark times scanned
and unrolled layers."""

import json
import os
import subprocess
import sys

from conftest import REPO


# Runs a script with `import tensorflow` / `import tensorflow_datasets` failing as if not installed.
WITHOUT_TF = ("import runpy, sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None); "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_train_vit_benchmark_reports_speed_and_profile_without_tensorflow(tmp_path):
  cmd = [sys.executable, "-c", WITHOUT_TF, os.path.join(REPO, "tools/benchmark.py"), "--threads", "1", "train-vit",
         "--width", "32", "--depth", "1", "--heads", "2", "--image-size", "32", "--patch", "8", "--batch", "4",
         "--rounds", "1", "--steps", "1", "--no-hf", "--dtype-mm", "bfloat16", "--profile", str(tmp_path / "trace")]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["benchmark"] == "train-vit" and out["vlm_jax_images_per_s"] > 0 and 0 < out["mfu"] < 1
  assert out["dtype_mm"] == "bfloat16" and out["peak_tflops"] > 0 and out["mfu_of_f32_peak"] > 0
  ops = out["ops_ms_per_step"]
  assert ops and all(v >= 0 for v in ops.values())
  assert "XLA ops by kind" in proc.stdout


def test_compile_benchmark_times_scan_and_unrolled(tmp_path):
  cmd = [sys.executable, os.path.join(REPO, "tools/benchmark.py"), "--threads", "1", "compile", "--width", "32",
         "--heads", "2", "--image-size", "32", "--patch", "8", "--batch", "4", "--depths", "1", "2"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [r["depth"] for r in out["rows"]] == [1, 2]
  assert all(r["scan_s"] > 0 and r["unrolled_s"] > 0 for r in out["rows"])
