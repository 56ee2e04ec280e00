"""Bad input, case by case (the table in RELIABILITY.md): each is one clear UserError line naming the
cause and the fix; the command line exits 2 without a traceback unless --debug."""

import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from vlm_jax import config, parallel, tasks, train
from vlm_jax.data import pipeline
from vlm_jax.errors import UserError
from vlm_jax.runtime import build

from conftest import REPO

TINY = os.path.join(REPO, "configs/vit_shapes.py:tiny")


def _parse(*overrides, recipe=TINY, workdir="--workdir=/tmp/unused"):
  """Parses a command line the way the train CLI does (fresh flags, so tests do not interfere)."""
  argv = ["train", "--config", recipe, *([workdir] if workdir else []), *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "recipe", flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
  config.parse_argv(fv, argv)
  return fv.config


@pytest.mark.parametrize("override, message", [
    ("--config.batch_size=abc", r"config: --config.batch_size=abc has the wrong type \(invalid literal for int"),
    ("--config.total_steps=1.5", r"config: --config.total_steps=1.5 has the wrong type"),
    ("--config.input.flip=maybe", r"config: --config.input.flip=maybe has the wrong type"),
    ("--config.model.widht=3", r"config: unknown key 'widht' in --config.model.widht. Did you mean 'width'\?"),
    ("--config.model.matmul=xla", r"config: invalid override --config.model.matmul: .*'matmul'.* Keys of every recipe"),
])
def test_config_overrides_of_wrong_type_or_unknown_key(override, message):
  with pytest.raises(UserError, match=message):
    _parse(override)


def test_an_unknown_key_names_its_own_override_not_the_first():
  with pytest.raises(UserError, match=r"invalid override --config.model.matmul: "):
    _parse("--config.data_dir=/tmp/d", "--config.model.matmul=xla")


def test_missing_recipe_file_and_missing_workdir():
  with pytest.raises(UserError, match=r"config: cannot load the recipe file: .*No such file or directory: "
                                      r"'nosuch.py'. Pass --config path/to/recipe.py"):
    _parse(recipe="nosuch.py")
  with pytest.raises(UserError, match=r"missing required flag --workdir; pass --workdir=\.\.\."):
    _parse(workdir="")


@pytest.mark.parametrize("override, message", [
    ("--config.task=", r"config: required key 'task' is missing or empty; set it in the recipe or with --config.task="),
    ("--config.total_steps=-5", r"config: 'total_steps' must be a positive integer, got -5"),
    ("--config.mesh=data=2,pipeline=4", r"mesh: unknown axis 'pipeline'. Axes are data, fsdp, tensor"),
    ("--config.mesh=data", r"mesh: 'data' is not AXIS=SIZE"),
    ("--config.input.image_size=0", r"'input.image_size' must be a positive integer, got 0"),
    ("--config.input.mean=(0.5,0.5)", r"'input.mean' must be 3 numbers \(one per RGB channel\)"),
    ("--config.input.random_crop_scale=(2.0,1.0)", r"'input.random_crop_scale' must be \(min, max\) area fractions "
                                                   r"with 0 < min <= max <= 1, got \(2.0, 1.0\)"),
    ("--config.input.max_len=0", r"'input.max_len' must be an integer >= 2 \(BOS and EOS take 2 positions\), got 0"),
    ("--config.evals.decode_len=-1", r"'evals.decode_len' must be an integer >= 0 \(0 means input.max_len - 1\)"),
    ("--config.evals.beam_size=0", r"'evals.beam_size' must be an integer >= 1"),
    ("--config.evals.decode=nucleus", r"evals.decode='nucleus' is unknown; use greedy, beam, sample"),
])
def test_config_values_that_cannot_run(override, message):
  cfg = _parse(override)
  with pytest.raises(UserError, match=message):
    config.validate(cfg)


@pytest.mark.parametrize("recipe, text, message", [
    ("vit_shapes", "caption", r"config: task 'classification' reads no text, but input.text='caption'\. Leave it empty"),
    ("cappa_shapes", "captions", r"config: input.text='captions' is unknown for task 'captioning'; use 'caption' or 'qa'"),
    ("siglip_shapes", "qa", r"config: task 'contrastive' needs input.text='caption', got 'qa'"),
])
def test_text_modes_a_task_does_not_read(recipe, text, message):
  """Each task validates `input.text` itself, with the rest of the config, before the dataset opens."""
  cfg = _parse(f"--config.input.text={text}", recipe=os.path.join(REPO, f"configs/{recipe}.py:tiny"))
  config.validate(cfg)  # the task-independent checks pass
  with pytest.raises(UserError, match=message):
    tasks.validate(cfg)
  cfg.data_dir = "/nonexistent/data"
  with pytest.raises(UserError, match=message):
    build(cfg, devices=jax.devices()[:1])


def test_impossible_mesh_for_the_device_count():
  with pytest.raises(UserError, match=r"mesh 'data=16,fsdp=1,tensor=1' needs 16 devices but 8 are present"):
    parallel.make_mesh("data=16,fsdp=1,tensor=1", jax.devices()[:8])
  with pytest.raises(UserError, match=r"the fixed axes multiply to 3, which does not divide the 8 devices"):
    parallel.make_mesh("data=-1,fsdp=3", jax.devices()[:8])


@pytest.mark.parametrize("key, value, message", [
    ("num_heads", 5, r"the model cannot be built from this config: width 32 is not divisible by num_heads 5\. "
                     r"Fix the model\.\* value"),
    ("pool", "bogus", r"pool must be one of \('cls', 'gap', 'map', 'none'\), got 'bogus'"),
    ("remat", "bogus", r"unknown remat policy 'bogus'; choose one of \['dots'"),
])
def test_model_settings_the_modules_refuse_are_one_error(tiny_config, key, value, message):
  tiny_config.model[key] = value
  with pytest.raises(UserError, match=message):
    build(tiny_config, devices=jax.devices()[:1])


def test_unknown_task_is_refused_before_the_dataset_is_opened(tiny_config, tmp_path):
  tiny_config.task = "captionig"
  tiny_config.data_dir = str(tmp_path / "no_data_here")
  known = ", ".join(sorted(tasks.TASKS))
  with pytest.raises(UserError, match=rf"config: unknown task 'captionig'\. Did you mean 'captioning'\? Known tasks: "
                                      rf"{known}\."):
    build(tiny_config, devices=jax.devices()[:1])
  assert not os.path.exists(tmp_path / "no_data_here")


def test_distributed_settings_that_cannot_start(tiny_config, monkeypatch):
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  d = tiny_config.distributed
  d.enable = "true"
  with pytest.raises(UserError, match=r"distributed.enable=true, but no cluster environment was detected .* Set "
                                      r"coordinator_address, num_processes and process_id"):
    parallel.initialize_distributed(tiny_config)
  d.enable, d.coordinator_address = "auto", "localhost:12345"
  with pytest.raises(UserError, match=r"also needs distributed.num_processes \(>= 1\) and this process's "
                                      r"distributed.process_id \(0 .. num_processes - 1\); got num_processes=0, "
                                      r"process_id=-1"):
    parallel.initialize_distributed(tiny_config)
  d.num_processes, d.process_id = 2, 2
  with pytest.raises(UserError, match=r"got num_processes=2, process_id=2"):
    parallel.initialize_distributed(tiny_config)


def test_url_workdir_is_refused_before_anything_is_written(tiny_config, tmp_path, monkeypatch):
  """os.path made 'gs://b/run' a local 'gs:/b/run' that trained and then failed at its first save."""
  from vlm_jax import evaluate
  from vlm_jax.hf import export
  monkeypatch.chdir(tmp_path)
  fix = r"Mount the bucket and pass the mount path \(e.g. `gcsfuse BUCKET /gcs/BUCKET` on every host"
  with pytest.raises(UserError, match=r"--workdir 'gs://bucket/run' is a URL; .*" + fix):
    train.train(tiny_config, "gs://bucket/run")
  with pytest.raises(UserError, match=r"--workdir 's3://bucket/run' is a URL"):
    evaluate.evaluate_workdir("s3://bucket/run")
  with pytest.raises(UserError, match=r"--out 'gs://bucket/hf' is a URL"):
    export.export_workdir(str(tmp_path), "gs://bucket/hf")
  assert os.listdir(tmp_path) == []


def test_empty_split_is_a_clear_error(tiny_config):
  inp = tiny_config.input
  inp.train_split = "train[:0]"
  with pytest.raises(UserError, match=r"split 'train\[:0\]' of 'shapes/tiny/.*' has no examples"):
    next(pipeline.train_batches(inp, tiny_config.data_dir, 0, 8))


def _png(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def test_task_and_dataset_that_do_not_fit(tiny_config, tmp_path):
  """A captions-only folder with a classification recipe, a class folder with a captioning recipe."""
  captions = tmp_path / "captions"
  _png(str(captions / "a.png"))
  (captions / "data.jsonl").write_text('{"image": "a.png", "caption": "a red square"}\n')
  cfg = tiny_config
  cfg.input.data, cfg.evals.splits = f"folder:{captions}", "train"
  with pytest.raises(UserError, match=r"task 'classification' needs a dataset with a class label; 'folder/captions-"):
    build(cfg, devices=jax.devices()[:1])
  classes = tmp_path / "classes"
  _png(str(classes / "red" / "a.png"))
  cap = config.load(os.path.join(REPO, "configs/cappa_shapes.py:tiny"))
  cap.data_dir, cap.input.data, cap.evals.splits = tiny_config.data_dir, f"folder:{classes}", "train"
  with pytest.raises(UserError, match=r"has none of the text features caption, .* \(it has image, path, label\)"):
    build(cap, devices=jax.devices()[:1])


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "vlm_jax.train", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_missing_workdir_and_recipe_are_one_line_exit_2(tmp_path):
  r = _cli("--config", "configs/vit_shapes.py:tiny")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "error: missing required flag --workdir; pass --workdir=..." in r.stderr
  r = _cli("--config", "configs/nosuch.py", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "error: config: cannot load the recipe file:" in r.stderr
  assert not os.path.exists(tmp_path / "w")  # nothing created for a run that cannot start


def test_predict_reads_formats_tensorflow_cannot_and_names_bad_files(tiny_config, tmp_path):
  from vlm_jax import predict
  Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "a.tif")
  Image.new("L", (40, 30), 90).save(tmp_path / "b.ppm")
  image = predict.load_image(str(tmp_path / "a.tif"), tiny_config.input)
  assert image.shape == (32, 32, 3) and abs(float(image[..., 1].mean()) - (200 / 255 - 0.5) / 0.5) < 0.02
  assert predict.load_image(str(tmp_path / "b.ppm"), tiny_config.input).shape == (32, 32, 3)
  (tmp_path / "c.tif").write_bytes(b"II*\x00 truncated tiff")
  with pytest.raises(ValueError, match=r"not a readable image \("):
    predict.load_image(str(tmp_path / "c.tif"), tiny_config.input)


def test_unknown_evaluation_split_is_refused_before_training(tiny_config):
  tiny_config.evals.splits = "validation,tset"
  with pytest.raises(UserError, match=r"split 'tset' of dataset 'shapes/tiny/.*' does not exist .*Available splits: "
                                      r".*choose among them with --config.input.train_split / --config.evals.splits"):
    build(tiny_config, devices=jax.devices()[:1])
