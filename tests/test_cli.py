"""The command line as a user runs it: a tiny end-to-end run, resume, and one-line errors."""

import json
import os
import subprocess
import sys

from conftest import REPO


def _run(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "vlm_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_tiny_run_end_to_end_then_resume(data_dir, tmp_path):
  wd = str(tmp_path / "run")
  base = ["--config", "configs/vit_shapes.py:tiny", "--workdir", wd, f"--config.data_dir={data_dir}"]
  r = _run(*base)
  assert r.returncode == 0, r.stderr[-2000:]
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


def test_evaluate_cli_appends_contract_metrics(data_dir, tmp_path):
  wd = str(tmp_path / "run")
  r = _run("--config", "configs/vit_shapes.py:tiny", "--workdir", wd, f"--config.data_dir={data_dir}",
           "--config.total_steps=4", "--config.checkpoint_every_steps=2", "--config.evals.pictures=0")
  assert r.returncode == 0, r.stderr[-2000:]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "vlm_jax.evaluate", "--workdir", wd, "--step", "2"], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "test/accuracy\t" in r.stdout and "validation/loss\t" in r.stdout
  last = json.loads(open(os.path.join(wd, "metrics.jsonl")).read().splitlines()[-1])
  assert last["step"] == 2 and 0.0 <= last["test/accuracy"] <= 1.0
  r = subprocess.run([sys.executable, "-m", "vlm_jax.evaluate", "--workdir", str(tmp_path)], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "has no config.json" in r.stderr


def test_recipe_error_is_one_line(tmp_path):
  r = _run("--config", "configs/vit_shapes.py:nosuchvariant", "--workdir", str(tmp_path))
  assert r.returncode == 2
  assert "error: config: the recipe raised ValueError: unknown variant 'nosuchvariant'" in r.stderr
  assert "Traceback" not in r.stderr
