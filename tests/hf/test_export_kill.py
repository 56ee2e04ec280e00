"""SIGKILL in the middle of `tools/convert_to_hf.py` (the weights file half-written): no folder
at --out, and the next export writes a complete one."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

from safetensors.numpy import load_file

from vlm_jax import config, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KILLED = textwrap.dedent("""
    import os, runpy, signal, sys
    from vlm_jax.hf import files
    def save_weights(out, state_dict):
      with open(os.path.join(out, files.WEIGHTS), "wb") as f:
        f.write(b"half a safetensors file")
      os.kill(os.getpid(), signal.SIGKILL)
    files.save_weights = save_weights
    sys.argv = ["convert_to_hf.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(sys.path[0] or ".", "tools/convert_to_hf.py"), run_name="__main__")
""")


def test_sigkill_during_export_leaves_no_export_and_the_next_one_succeeds(data_dir, tmp_path):
  cfg = config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny"))
  with cfg.unlocked():
    cfg.data_dir, cfg.total_steps, cfg.checkpoint_every_steps, cfg.evals.splits = data_dir, 2, 2, ""
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  train.train(cfg, workdir)
  args = ["--workdir", workdir, "--out", out]
  env = dict(os.environ, PYTHONPATH=REPO)
  killed = subprocess.run([sys.executable, "-c", KILLED, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not os.path.exists(out)  # the half export lies in a hidden temporary folder
  assert glob.glob(str(tmp_path / ".hf-export-*" / "model.safetensors"))
  proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  weights = load_file(os.path.join(out, "model.safetensors"))
  assert weights and all(v.dtype.name == "float32" for v in weights.values())
  assert json.load(open(os.path.join(out, "config.json")))["architectures"]
