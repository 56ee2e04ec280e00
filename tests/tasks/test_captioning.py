"""Captioning and VQA through the one trainer: losses fall, metrics of the contract, fine-tuning."""

import os

import jax
import numpy as np
import pytest

from vlm_jax import config, parallel, reporting, train
from vlm_jax.data import pipeline, tokenizer as tokenizer_lib
from vlm_jax.errors import UserError
from vlm_jax.runtime import build

from conftest import REPO


def _cfg(data_dir, recipe="cappa_shapes"):
  cfg = config.load(os.path.join(REPO, f"configs/{recipe}.py:tiny"))
  cfg.data_dir = data_dir
  return cfg


def test_parallel_prediction_changes_the_objective(data_dir):
  cfg = _cfg(data_dir)
  s = build(cfg, devices=jax.devices()[:1])
  batch = next(pipeline.train_batches(cfg.input, data_dir, 0, 8, tokenizer=s.task.tokenizer))
  assert batch["tokens"][:, 0].tolist() == [s.task.tokenizer.bos_id] * 8
  with s.context():
    params = s.init_state(jax.random.PRNGKey(0)).params
    gb = parallel.shard_batch(batch, s.mesh)
    # Jitted (one compile per setting, read while tracing) rather than run op by op: faster on CPU.
    loss = lambda: float(jax.jit(lambda p, b, r: s.task.loss_fn(p, b, r)[0])(params, gb, jax.random.PRNGKey(1)))
    s.task.masked_pred_prob = 0.0
    causal = loss()
    s.task.masked_pred_prob = 1.0
    masked = loss()
  assert np.isfinite(causal) and np.isfinite(masked) and abs(causal - masked) > 1e-4


def test_caption_then_vqa_finetune(data_dir, tmp_path):
  cfg = _cfg(data_dir)
  cfg.eval_every_steps = cfg.total_steps  # one evaluation, at the end (the one checked below)
  cap = str(tmp_path / "cap")
  results = train.train(cfg, cap)
  assert {"test/bleu4", "test/cider", "test/perplexity", "validation/bleu4"} <= set(results)
  rows = [r for r in reporting.read_metrics(cap) if "train/loss" in r]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert os.path.exists(os.path.join(cap, "tokenizer.json"))
  assert os.listdir(os.path.join(cap, "pictures"))
  assert all("train/texts_truncated" in r for r in rows)

  vqa = _cfg(data_dir, "vqa_shapes")
  vqa.init_from, vqa.eval_every_steps = cap, vqa.total_steps
  results = train.train(vqa, str(tmp_path / "vqa"))
  assert 0.0 <= results["test/vqa_accuracy"] <= 1.0 and "test/perplexity" in results
  rows = [r for r in reporting.read_metrics(str(tmp_path / "vqa")) if "train/loss" in r]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]

  # A tokenizer other than the checkpoint's is refused, for init_from and for resuming.
  other = os.path.join(tmp_path, "other.json")
  tokenizer_lib.train_tokenizer(["a blue cube", "two green stars"] * 20, vocab_size=60).save(other)
  saved = open(os.path.join(cap, "tokenizer.json"), "rb").read()
  vqa.input.tokenizer = other
  with pytest.raises(UserError, match="does not match .*cap/tokenizer.json"):
    build(vqa)
  cfg.input.tokenizer, cfg.total_steps = other, cfg.total_steps + 2
  with pytest.raises(UserError, match="Resume with --config.input.tokenizer="):
    train.train(cfg, cap)
  assert open(os.path.join(cap, "tokenizer.json"), "rb").read() == saved
