"""python -m vlm_jax.predict: any image size/mode/format, bad files get an error line, others run."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO


def _images(d):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(d / "a.jpg")
  Image.fromarray(rgb).convert("RGBA").save(d / "b.png")
  Image.fromarray(rgb).convert("L").save(d / "c.png")
  Image.fromarray(rgb).convert("P").save(d / "d.gif")
  Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(d / "e16.png")
  (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (d / "empty.png").write_bytes(b"")
  return [str(d / n) for n in ("a.jpg", "b.png", "c.png", "d.gif", "e16.png", "corrupt.jpg", "empty.png",
                               "missing.png")]


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_predict_labels_and_error_lines(data_dir, tmp_path):
  wd = str(tmp_path / "run")
  r = _run("-m", "vlm_jax.train", "--config", "configs/vit_shapes.py:tiny", "--workdir", wd,
           f"--config.data_dir={data_dir}", "--config.total_steps=2", "--config.evals.pictures=0")
  assert r.returncode == 0, r.stderr[-2000:]
  paths = _images(tmp_path)
  r = _run("-m", "vlm_jax.predict", "--workdir", wd, "--image", *paths)
  assert r.returncode == 1, r.stderr[-2000:]  # some files failed, the rest were predicted
  lines = dict(line.split("\t", 1) for line in r.stdout.strip().splitlines())
  assert list(lines) == paths
  classes = {"red", "green", "blue", "yellow", "purple", "white"}
  for p in paths[:5]:
    assert lines[p].split()[0] in classes, lines[p]
  for p in paths[5:]:
    assert lines[p].startswith("error: cannot read image"), lines[p]
  assert "no such file" in lines[paths[7]] and "empty file" in lines[paths[6]]
