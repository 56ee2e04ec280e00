"""The trainer: loss falls, exact resume, clear errors (sharding tests: test_parallel.py)."""

import os
import shutil

import jax
import numpy as np
import pytest

from vlm_jax import checkpoint, config, logging as vlog, parallel, train
from vlm_jax.data import pipeline
from vlm_jax.errors import UserError

from conftest import REPO


def _batch(cfg, n):
  return next(pipeline.train_batches(cfg.input, cfg.data_dir, 0, n))


def test_loss_falls_on_a_fixed_batch(tiny_config):
  cfg = tiny_config
  cfg.optimizer.warmup_steps, cfg.optimizer.schedule, cfg.optimizer.learning_rate = 1, "constant", 3e-3
  s = train.build(cfg, devices=jax.devices()[:1])
  step = train.make_train_step(s)
  batch = _batch(cfg, 32)
  with s.context():
    state = s.init_state(jax.random.PRNGKey(0))
    losses = []
    for _ in range(30):
      state, m = step(state, parallel.shard_batch(batch, s.mesh))
      losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_resume_reproduces_uninterrupted_run(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 8, 100, 4
  cfg.evals.pictures = 0
  full, cut = tmp_path / "full", tmp_path / "cut"
  train.train(cfg, str(full))
  # A run killed after its step-4 checkpoint: step 8 never committed, metrics logged past step 4.
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "8")
  train.train(cfg, str(cut))
  s = train.build(cfg)
  states = []
  for wd in (full, cut):
    ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"))
    assert ckpt.latest_step() == 8
    with s.context():
      states.append(ckpt.restore(8, s.abstract_state))
    ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), states[0], states[1])
  steps = [r["step"] for r in vlog.read_metrics(str(cut)) if "train/loss" in r]
  assert steps == [5, 8]  # the step-5 line logged before the "kill" is not duplicated
  assert vlog.read_metrics(str(cut), clock=False) == vlog.read_metrics(str(full), clock=False)


def test_checkpoint_of_another_model_is_refused_and_kept(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 2, 100, 2
  cfg.evals.pictures = 0
  train.train(cfg, str(tmp_path))
  before = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "checkpoints") for f in fs}
  cfg.model.width = 48
  cfg.total_steps = 4
  with pytest.raises(UserError, match=r"different model shape: 'params/.*' is \(32,\) there but \(48,\)"):
    train.train(cfg, str(tmp_path))
  after = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "checkpoints") for f in fs}
  assert before == after


def test_batch_not_divisible_by_data_shards_is_clear(tiny_config):
  cfg = tiny_config
  cfg.batch_size = 12
  with pytest.raises(UserError, match="batch_size=12 is not divisible by the 8 data-parallel shards"):
    train.build(cfg, devices=jax.devices()[:8])


def test_init_from_other_run_resizes_position_embedding(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 2, 100, 2
  cfg.evals.pictures = 0
  train.train(cfg, str(tmp_path / "pre"))
  pre = checkpoint.Checkpointer(str(tmp_path / "pre" / "checkpoints"))
  s = train.build(cfg)
  with s.context():
    source = pre.restore(2, s.abstract_state).params
  pre.close()
  cfg.input.image_size = 48  # 6x6 patches instead of 4x4
  s48 = train.build(cfg)
  with s48.context():
    fresh = s48.init_state(jax.random.PRNGKey(0)).params
  params, copied = checkpoint.load_params(str(tmp_path / "pre"), fresh, include="^encoder/|pos_embedding")
  assert "pos_embedding" in copied and not any(p.startswith("head/") for p in copied)
  assert params["pos_embedding"].shape == (1, 36, 32)
  np.testing.assert_array_equal(params["encoder"]["norm"]["scale"], np.asarray(source["encoder"]["norm"]["scale"]))
  np.testing.assert_array_equal(params["head"]["kernel"], np.asarray(fresh["head"]["kernel"]))
  with pytest.raises(UserError, match="does not exist"):
    checkpoint.load_params(str(tmp_path / "nothing"), fresh)

  # The classifier's encoder as a captioner's image tower: source paths get the 'img/' prefix.
  cap = config.load(os.path.join(REPO, "configs/cappa_shapes.py:tiny"))
  cap.data_dir = cfg.data_dir
  sc = train.build(cap)
  with sc.context():
    fresh = sc.init_state(jax.random.PRNGKey(0)).params
  with pytest.raises(UserError, match="init_prefix"):
    checkpoint.load_params(str(tmp_path / "pre"), fresh, include="^img/encoder/")
  params, copied = checkpoint.load_params(str(tmp_path / "pre"), fresh, "^img/encoder/", prefix="img/")
  assert copied and all(p.startswith("img/encoder/") for p in copied)
  jax.tree.map(np.testing.assert_array_equal, params["img"]["encoder"], jax.device_get(source["encoder"]))


def test_finetune_with_frozen_encoder_keeps_it_bitwise(tiny_config, tmp_path):
  """init_from + optimizer.freeze on an FSDP mesh: the frozen encoder is the source's, bit for bit,
  through sharded updates and a checkpoint round trip; the head trains."""
  cfg = tiny_config
  cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 2, 100, 2
  cfg.evals.pictures = 0
  train.train(cfg, str(tmp_path / "pre"))
  cfg.init_from, cfg.init_include = str(tmp_path / "pre"), "^encoder/"
  cfg.optimizer.freeze, cfg.optimizer.lr_multipliers = "^encoder/", "^head/=10"
  cfg.mesh = "data=1,fsdp=8,tensor=1"
  train.train(cfg, str(tmp_path / "ft"))
  out = {}
  for name in ("ft", "pre"):
    if name == "pre":
      cfg.optimizer.freeze, cfg.optimizer.lr_multipliers = "", ""
    s = train.build(cfg)
    ckpt = checkpoint.Checkpointer(str(tmp_path / name / "checkpoints"))
    with s.context():
      out[name] = jax.device_get(ckpt.restore(2, s.abstract_state).params)
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, out["pre"]["encoder"], out["ft"]["encoder"])
  assert not np.array_equal(out["pre"]["head"]["kernel"], out["ft"]["head"]["kernel"])
