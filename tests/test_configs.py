"""Every recipe loads and validates; real-scale recipes build their model and run one sharded step
at a tiny size (their datasets cannot be downloaded here)."""

import glob
import os

import jax
import numpy as np
import pytest

from vlm_jax import config, parallel
from vlm_jax.data.sources import DataInfo
from vlm_jax.errors import UserError
from vlm_jax.runtime import build
from vlm_jax.step import make_train_step

from conftest import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_loads_and_validates(path):
  cfg = config.load(path)
  config.validate(cfg)


def test_config_json_of_an_older_version_gets_new_keys_as_defaults():
  """A workdir written before a key existed (here nan_policy, optimizer.freeze) still evaluates."""
  import json
  d = json.loads(config.to_json(config.load(os.path.join(REPO, "configs/vit_shapes.py"))))
  del d["nan_policy"], d["optimizer"]["freeze"]
  d["optimizer"]["learning_rate"] = 0.123
  cfg = config.from_json(json.dumps(d))
  assert cfg.nan_policy == config.base_config().nan_policy and cfg.optimizer.freeze == ""
  assert cfg.optimizer.learning_rate == 0.123  # saved values win
  config.validate(cfg)


def test_config_json_with_retired_kernel_settings_still_builds():
  """A workdir whose config.json records model.matmul and model.attention='cpu_fused' (the retired
  CPU kernels; in a tower too) loads with them dropped / mapped to 'auto' and builds its task; a
  recipe still holding one is one clear error."""
  import json
  d = json.loads(config.to_json(config.load(os.path.join(REPO, "configs/cappa_shapes.py"))))
  d["model"].update(matmul="cpu_fused", attention="cpu_fused")
  d["model"]["encoder"]["matmul"] = "auto"
  cfg = config.from_json(json.dumps(d))
  assert "matmul" not in cfg.model and "matmul" not in cfg.model.encoder and cfg.model.attention == "auto"
  d = json.loads(config.to_json(config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny"))))
  d["model"].update(matmul="auto", attention="cpu_fused")
  s = build(config.from_json(json.dumps(d)), DataInfo("shapes", 4, list("abcd"), {}, ()),
                  devices=jax.devices()[:1])
  assert s.task.model.attention_fn is None  # "auto" on a CPU: XLA's attention
  recipe = config.load(os.path.join(REPO, "configs/vit_shapes.py"))
  with recipe.unlocked():
    recipe.model.matmul = "xla"
  with pytest.raises(UserError, match=r"model.matmul='xla' is a retired setting .* delete it from the recipe"):
    config.validate(recipe)


def test_vit_b16_imagenet_one_fsdp_step_at_tiny_size():
  cfg = config.load(os.path.join(REPO, "configs/vit_b16_imagenet.py"))
  assert cfg.model.dtype == "bfloat16" and cfg.mesh.startswith("data=1,fsdp=-1")
  cfg.model.width, cfg.model.depth, cfg.model.num_heads, cfg.model.mlp_dim = 32, 2, 2, 64
  cfg.input.image_size, cfg.batch_size = 32, 16
  info = DataInfo("imagenet2012", 1000, None, {"train": 1281167, "validation": 50000}, ("image", "label"))
  s = build(cfg, data_info=info, devices=jax.devices()[:8])
  step = make_train_step(s)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 1000, 16).astype(np.int32)}
  with s.context():
    state = s.init_state(jax.random.PRNGKey(0))
    state, metrics = step(state, parallel.shard_batch(batch, s.mesh))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  assert abs(float(metrics["loss"]) - np.log(1000)) < 0.5
  head = state.params["head"]["kernel"]
  assert head.shape == (32, 1000) and head.addressable_shards[0].data.shape == (4, 1000)


def test_cappa_b16_coco_one_fsdp_step_at_tiny_size(tmp_path):
  from vlm_jax.data import tokenizer as tokenizer_lib

  cfg = config.load(os.path.join(REPO, "configs/cappa_b16_coco.py"))
  assert cfg.model.dtype == "bfloat16" and cfg.input.caption_key == "captions/text"
  cfg.model.encoder.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  cfg.model.decoder.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  cfg.input.image_size, cfg.batch_size = 32, 16
  tok = tokenizer_lib.train_tokenizer(["a man riding a horse on a beach", "two dogs on a couch"] * 10, 80)
  cfg.input.tokenizer = str(tmp_path / "tokenizer.json")
  tok.save(cfg.input.tokenizer)
  info = DataInfo("coco_captions", 0, None, {"train": 82783, "restval": 30504, "val": 5000, "test": 5000},
                  ("image", "captions", "objects"))
  s = build(cfg, data_info=info, devices=jax.devices()[:8])
  step = make_train_step(s)
  rng = np.random.default_rng(0)
  tokens, _ = tok.caption_sequences(["a man riding a horse"] * 16, cfg.input.max_len)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32), "tokens": tokens}
  with s.context():
    state = s.init_state(jax.random.PRNGKey(0))
    state, metrics = step(state, parallel.shard_batch(batch, s.mesh))
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
  emb = state.params["txt"]["token_embed"]["embedding"]
  assert emb.shape == (tok.vocab_size, 32)

def test_siglip_b16_coco_one_fsdp_step_at_tiny_size(tmp_path):
  from vlm_jax.data.tokenizer import train_tokenizer

  cfg = config.load(os.path.join(REPO, "configs/siglip_b16_coco.py"))
  assert cfg.model.dtype == "bfloat16" and cfg.mesh.startswith("data=1,fsdp=-1") and cfg.model.image.pool == "map"
  cfg.model.image.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  cfg.model.text.update(dict(width=48, depth=2, num_heads=2, mlp_dim=64))
  cfg.input.image_size, cfg.input.max_len, cfg.batch_size = 32, 16, 16
  # coco_captions cannot be prepared here: its tokenizer comes from a file instead.
  cfg.input.tokenizer = train_tokenizer(["a man riding a horse", "two cats on a sofa"], 100).save(str(tmp_path))
  info = DataInfo("coco_captions", 0, None, {"train": 82783, "test": 5000}, ("image", "captions"))
  s = build(cfg, data_info=info, devices=jax.devices()[:8])
  step = make_train_step(s)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "tokens": rng.integers(1, 50, (16, 16)).astype(np.int32)}
  with s.context():
    state = s.init_state(jax.random.PRNGKey(0))
    state, metrics = step(state, parallel.shard_batch(batch, s.mesh))
  # Random towers: cosines ~0, so each positive pair costs -log sigmoid(-10) ~ 10 and negatives ~0.
  assert int(state.step) == 1 and abs(float(metrics["loss"]) - 10.0) < 0.5
  fc1 = state.params["img"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
  assert fc1.shape == (2, 32, 64) and fc1.addressable_shards[0].data.shape == (2, 4, 64)
