"""The command line as a user runs it: a tiny end-to-end run, resume, evaluate and predict on its
checkpoints, and one-line errors. One `python -m vlm_jax.train` run of the tiny recipe (module
fixture) serves the resume, evaluate and predict tests; each works on its own copy of it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "vlm_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
  """The tiny recipe as a user runs it (20 steps, checkpoints at 10 and 20); tests copy it before
  changing it."""
  wd = str(tmp_path_factory.mktemp("cli") / "run")
  r = _run("--config", "configs/vit_shapes.py:tiny", "--workdir", wd, f"--config.data_dir={data_dir}")
  assert r.returncode == 0, r.stderr[-2000:]
  return wd


def _copy(tiny_run, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(tiny_run, wd)
  return wd


def test_tiny_run_end_to_end_then_resume(tiny_run, data_dir, tmp_path):
  wd = _copy(tiny_run, tmp_path)
  base = ["--config", "configs/vit_shapes.py:tiny", "--workdir", wd, f"--config.data_dir={data_dir}"]
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("test/accuracy" in x and x["step"] == 20 for x in rows)
  assert any("train/images_per_s" in x for x in rows)
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["total_steps"] == 20 and cfg["data_dir"] == data_dir
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20"]
  assert os.listdir(os.path.join(wd, "pictures")) and os.listdir(os.path.join(wd, "tensorboard"))
  r = _run(*base, "--config.total_steps=25")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Resuming from" in r.stdout + r.stderr
  steps = [json.loads(x)["step"] for x in open(os.path.join(wd, "metrics.jsonl"))]
  assert max(steps) == 25 and 5 in steps


def test_mistyped_config_key_is_one_line_with_suggestion(tmp_path):
  r = _run("--config", "configs/vit_shapes.py:tiny", "--workdir", str(tmp_path), "--config.model.widht=3")
  assert r.returncode == 2
  assert "error: config: unknown key 'widht' in --config.model.widht. Did you mean 'width'?" in r.stderr
  assert "Traceback" not in r.stderr


def test_unprepared_dataset_names_data_dir(tmp_path):
  r = _run("--config", "configs/vit_shapes.py:tiny", "--workdir", str(tmp_path / "w"),
           "--config.input.data=cifar10", f"--config.data_dir={tmp_path}")
  assert r.returncode == 2
  assert f"dataset 'cifar10' is not prepared in data_dir '{tmp_path}'" in r.stderr
  assert "Traceback" not in r.stderr


def test_debug_flag_shows_traceback(tmp_path):
  r = _run("--config", "configs/vit_shapes.py:tiny", "--workdir", str(tmp_path / "w"),
           "--config.input.data=cifar10", f"--config.data_dir={tmp_path}", "--debug")
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_evaluate_cli_appends_contract_metrics(tiny_run, tmp_path):
  wd = _copy(tiny_run, tmp_path)  # checkpoints 10 and 20: evaluate the older one
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "vlm_jax.evaluate", "--workdir", wd, "--step", "10"], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "test/accuracy\t" in r.stdout and "validation/loss\t" in r.stdout
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  trained = next(x for x in rows if x["step"] == 10 and "test/accuracy" in x)  # the trainer's own evaluation
  last = rows[-1]
  assert last["step"] == 10 and last["test/accuracy"] == pytest.approx(trained["test/accuracy"], abs=1e-9)
  assert last["validation/loss"] == pytest.approx(trained["validation/loss"], rel=1e-5)
  r = subprocess.run([sys.executable, "-m", "vlm_jax.evaluate", "--workdir", str(tmp_path)], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "has no config.json" in r.stderr


def test_recipe_error_is_one_line(tmp_path):
  r = _run("--config", "configs/vit_shapes.py:nosuchvariant", "--workdir", str(tmp_path))
  assert r.returncode == 2
  assert "error: config: the recipe raised ValueError: unknown variant 'nosuchvariant'" in r.stderr
  assert "Traceback" not in r.stderr


# python -m vlm_jax.predict: any image size/mode/format, bad files get an error line, others run.

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


def test_predict_labels_and_error_lines(tiny_run, tmp_path):
  wd = _copy(tiny_run, tmp_path)
  paths = _images(tmp_path)
  r = subprocess.run([sys.executable, "-m", "vlm_jax.predict", "--workdir", wd, "--image", *paths], cwd=REPO,
                     capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1, r.stderr[-2000:]  # some files failed, the rest were predicted
  lines = dict(line.split("\t", 1) for line in r.stdout.strip().splitlines())
  assert list(lines) == paths
  classes = {"red", "green", "blue", "yellow", "purple", "white"}
  for p in paths[:5]:
    assert lines[p].split()[0] in classes, lines[p]
  for p in paths[5:]:
    assert lines[p].startswith("error: cannot read image"), lines[p]
  assert "no such file" in lines[paths[7]] and "empty file" in lines[paths[6]]
