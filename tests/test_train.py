"""The trainer: loss falls, exact resume, clear errors (sharding tests: test_parallel.py)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from vlm_jax import checkpoint, config, init, parallel, reporting, train, workdir as workdir_lib
from vlm_jax.data import pipeline
from vlm_jax.errors import UserError
from vlm_jax.runtime import build, restore_run
from vlm_jax.step import make_train_step

from conftest import REPO


def _batch(cfg, n):
  return next(pipeline.train_batches(cfg.input, cfg.data_dir, 0, n))


def _short(cfg):
  """4 steps, checkpoints at 2 and 4, train lines at 3 and 4, one evaluation (at the end)."""
  cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps, cfg.log_every_steps = 4, 100, 2, 3
  cfg.evals.pictures = 0
  return cfg


@pytest.fixture(scope="module")
def pre(data_dir, tmp_path_factory):
  """One finished `_short` run of the tiny recipe, shared by the tests below (the same compiled
  programs, trained once); a test that writes into it works on a copy."""
  cfg = _short(config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny")))
  cfg.data_dir = data_dir
  wd = tmp_path_factory.mktemp("pre") / "run"
  train.train(cfg, str(wd))
  return wd


def test_loss_falls_on_a_fixed_batch(tiny_config):
  cfg = tiny_config
  cfg.optimizer.warmup_steps, cfg.optimizer.schedule, cfg.optimizer.learning_rate = 1, "constant", 3e-3
  s = build(cfg, devices=jax.devices()[:1])
  step = make_train_step(s)
  batch = _batch(cfg, 32)
  with s.context():
    state = s.init_state(jax.random.PRNGKey(0))
    losses = []
    for _ in range(30):
      state, m = step(state, parallel.shard_batch(batch, s.mesh))
      losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_resume_reproduces_uninterrupted_run(pre, tiny_config, tmp_path):
  cfg = _short(tiny_config)
  full, cut = pre, tmp_path / "cut"
  # A run killed after its step-2 checkpoint: step 4 never committed, metrics logged past step 2.
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "4")
  train.train(cfg, str(cut))
  s = build(cfg)
  states = []
  for wd in (full, cut):
    ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"))
    assert ckpt.latest_step() == 4
    with s.context():
      states.append(ckpt.restore(4, s.abstract_state))
    ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), states[0], states[1])
  steps = [r["step"] for r in reporting.read_metrics(str(cut)) if "train/loss" in r]
  assert steps == [3, 4]  # the step-3 line logged before the "kill" is not duplicated
  assert reporting.read_metrics(str(cut), clock=False) == reporting.read_metrics(str(full), clock=False)


def test_resume_onto_another_mesh_continues_the_run(pre, tiny_config, tmp_path):
  """A run checkpointed on a data-parallel mesh resumes under FSDP x tensor parallelism (a preempted
  job restarted on a differently shaped slice): Orbax reshards the state onto the new mesh, and the
  steps after the checkpoint match the uninterrupted run."""
  cfg = _short(tiny_config)
  assert config.parse_mesh(cfg.mesh) != {"data": 2, "fsdp": 2, "tensor": 2}
  cut = tmp_path / "cut"
  shutil.copytree(pre, cut)
  shutil.rmtree(cut / "checkpoints" / "4")
  cfg.mesh = "data=2,fsdp=2,tensor=2"
  train.train(cfg, str(cut))
  s = build(cfg)
  ckpt = checkpoint.Checkpointer(str(cut / "checkpoints"))
  with s.context():
    state = ckpt.restore(4, s.abstract_state)
  ckpt.close()
  largest = max(jax.tree.leaves(state.params), key=lambda x: x.size)
  assert largest.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert not largest.sharding.is_fully_replicated, largest.sharding
  losses = [{r["step"]: r["train/loss"] for r in reporting.read_metrics(str(wd)) if "train/loss" in r} for wd in (pre, cut)]
  assert sorted(losses[1]) == [3, 4]
  np.testing.assert_allclose([losses[1][k] for k in (3, 4)], [losses[0][k] for k in (3, 4)], atol=1e-5, rtol=0)


def test_a_run_from_a_bigger_mesh_restores_here_for_evaluation_and_export(pre, tmp_path, capsys):
  """evaluate / predict / convert_to_hf restore a run with its own config: one trained on more
  devices than this host has (its mesh recorded as 32-way) is restored onto FSDP over the 8 here,
  or onto --mesh, with the same values."""
  wd = tmp_path / "big"
  shutil.copytree(pre, wd)
  recorded = json.loads((wd / "config.json").read_text())
  recorded["mesh"] = "data=4,fsdp=8,tensor=1"
  (wd / "config.json").write_text(json.dumps(recorded))
  s, params, step = restore_run(str(wd))
  assert step == 4 and dict(s.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert "the run's mesh 'data=4,fsdp=8,tensor=1' does not fit the 8 device(s) here" in capsys.readouterr().err
  _, reference, _ = restore_run(str(pre))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, reference)
  s, _, _ = restore_run(str(wd), mesh="data=2,fsdp=2,tensor=2")
  assert dict(s.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2} and not capsys.readouterr().err


def test_resume_with_another_batch_size_or_seed_says_where_the_input_resumes(tiny_config, tmp_path, capsys):
  cfg = tiny_config
  (tmp_path / "config.json").write_text(config.to_json(cfg))
  workdir_lib.note_changed_input(str(tmp_path), cfg, 40)
  assert capsys.readouterr().err == ""
  old_batch = cfg.batch_size
  cfg.batch_size, cfg.seed = old_batch // 2, cfg.seed + 1
  workdir_lib.note_changed_input(str(tmp_path), cfg, 40)
  err = capsys.readouterr().err
  assert (f"batch_size is {old_batch // 2}, the run that saved step 40 used {old_batch}: the input resumes at "
          f"example {40 * old_batch // 2} of the shuffled stream, not at {40 * old_batch}") in err
  assert f"seed is {cfg.seed}, the run that saved step 40 used {cfg.seed - 1}" in err


def test_checkpoint_of_another_model_is_refused_and_kept(pre, tiny_config, tmp_path):
  cfg = _short(tiny_config)
  wd = tmp_path / "run"
  shutil.copytree(pre, wd)
  before = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(wd / "checkpoints") for f in fs}
  cfg.model.width = 48
  cfg.total_steps = 6
  with pytest.raises(UserError, match=r"different model shape: 'params/.*' is \(32,\) there but \(48,\)"):
    train.train(cfg, str(wd))
  after = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(wd / "checkpoints") for f in fs}
  assert before == after


def test_batch_not_divisible_by_data_shards_is_clear(tiny_config):
  cfg = tiny_config
  cfg.batch_size = 12
  with pytest.raises(UserError, match="batch_size=12 is not divisible by the 8 data-parallel shards"):
    build(cfg, devices=jax.devices()[:8])


def test_init_from_other_run_resizes_position_embedding(pre, tiny_config, tmp_path):
  cfg = _short(tiny_config)
  ckpt = checkpoint.Checkpointer(str(pre / "checkpoints"))
  s = build(cfg)
  with s.context():
    source = ckpt.restore(4, s.abstract_state).params  # the latest step, which init_from reads
  ckpt.close()
  cfg.input.image_size = 48  # 6x6 patches instead of 4x4
  s48 = build(cfg)
  with s48.context():
    fresh = s48.init_state(jax.random.PRNGKey(0)).params
  params, copied = init.load_params(str(pre), fresh, include="^encoder/|pos_embedding")
  assert "pos_embedding" in copied and not any(p.startswith("head/") for p in copied)
  # Half-pixel bilinear upsampling 4x4 -> 6x6, edges clamped, computed here in numpy.
  x = np.clip((np.arange(6) + 0.5) * 4 / 6 - 0.5, 0, 3)
  lo = np.floor(x).astype(int)
  hi, w = np.minimum(lo + 1, 3), x - lo
  up = np.zeros((6, 4))
  up[np.arange(6), lo] += 1 - w
  up[np.arange(6), hi] += w
  grid = np.asarray(source["pos_embedding"]).reshape(4, 4, 32)
  want = np.einsum("Yy,yxd,Xx->YXd", up, grid, up).reshape(1, 36, 32)
  np.testing.assert_allclose(params["pos_embedding"], want, atol=1e-6)
  np.testing.assert_array_equal(params["encoder"]["norm"]["scale"], np.asarray(source["encoder"]["norm"]["scale"]))
  np.testing.assert_array_equal(params["head"]["kernel"], np.asarray(fresh["head"]["kernel"]))
  with pytest.raises(UserError, match="does not exist"):
    init.load_params(str(tmp_path / "nothing"), fresh)

  # The classifier's encoder as a captioner's image tower: source paths get the 'img/' prefix.
  cap = config.load(os.path.join(REPO, "configs/cappa_shapes.py:tiny"))
  cap.data_dir = cfg.data_dir
  sc = build(cap)
  with sc.context():
    fresh = sc.init_state(jax.random.PRNGKey(0)).params
  with pytest.raises(UserError, match="init_prefix"):
    init.load_params(str(pre), fresh, include="^img/encoder/")
  params, copied = init.load_params(str(pre), fresh, "^img/encoder/", prefix="img/")
  assert copied and all(p.startswith("img/encoder/") for p in copied)
  jax.tree.map(np.testing.assert_array_equal, params["img"]["encoder"], jax.device_get(source["encoder"]))


def test_finetune_with_frozen_encoder_keeps_it_bitwise(pre, tiny_config, tmp_path):
  """init_from + optimizer.freeze on an FSDP mesh: the frozen encoder is the source's, bit for bit,
  through sharded updates and a checkpoint round trip; the head trains."""
  cfg = _short(tiny_config)
  cfg.total_steps, cfg.checkpoint_every_steps = 2, 2
  cfg.init_from, cfg.init_include = str(pre), "^encoder/"  # its latest checkpoint: step 4
  cfg.optimizer.freeze, cfg.optimizer.lr_multipliers = "^encoder/", "^head/=10"
  cfg.mesh = "data=1,fsdp=8,tensor=1"
  train.train(cfg, str(tmp_path / "ft"))
  out = {}
  for name, wd, step in (("ft", tmp_path / "ft", 2), ("pre", pre, 4)):
    if name == "pre":
      cfg.optimizer.freeze, cfg.optimizer.lr_multipliers = "", ""
    s = build(cfg)
    ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"))
    with s.context():
      out[name] = jax.device_get(ckpt.restore(step, s.abstract_state).params)
    ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, out["pre"]["encoder"], out["ft"]["encoder"])
  assert not np.array_equal(out["pre"]["head"]["kernel"], out["ft"]["head"]["kernel"])
