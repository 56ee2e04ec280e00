"""Captioning and VQA through the one trainer: losses fall, metrics of the contract, fine-tuning."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config, parallel, reporting, train
from vlm_jax.data import pipeline, tokenizer as tokenizer_lib
from vlm_jax.errors import UserError
from vlm_jax.models.text import Decoder
from vlm_jax.runtime import build

from conftest import REPO


def _cfg(data_dir, recipe="cappa_shapes"):
  cfg = config.load(os.path.join(REPO, f"configs/{recipe}.py:tiny"))
  cfg.data_dir = data_dir
  return cfg


def test_parallel_prediction_rows_read_only_mask_and_attend_both_ways(data_dir):
  """masked_pred_prob=0.5: the rows the step's key picks get all-MASK decoder inputs and no causal
  mask; the other rows keep their teacher-forced tokens and the causal mask."""
  cfg = _cfg(data_dir)
  s = build(cfg, devices=jax.devices()[:1])
  task, tok = s.task, s.task.tokenizer
  batch = next(pipeline.train_batches(cfg.input, data_dir, 0, 8, features=task.features(cfg.input),
                                      encode=task.encode))
  assert batch["tokens"][:, 0].tolist() == [tok.bos_id] * 8
  task.masked_pred_prob = 0.5
  rng = jax.random.PRNGKey(1)
  # The module docstring's rule: one coin per example, drawn with the second half of the step's key.
  parallel_rows = np.asarray(jax.random.bernoulli(jax.random.split(rng)[1], 0.5, (8,)))
  assert 0 < parallel_rows.sum() < 8, parallel_rows  # this key draws both kinds of rows
  seen = {}

  def record_decoder_call(next_fun, args, kwargs, context):
    if isinstance(context.module, Decoder) and context.method_name == "__call__":
      jax.debug.callback(lambda t, c: seen.update(tokens=np.asarray(t), causal=np.asarray(c)),
                         args[0], kwargs["causal"])
    return next_fun(*args, **kwargs)

  with s.context():
    params = s.init_state(jax.random.PRNGKey(0)).params
    gb = parallel.shard_batch(batch, s.mesh)
    with nn.intercept_methods(record_decoder_call):
      jax.block_until_ready(jax.jit(lambda p, b, r: task.loss_fn(p, b, r)[0])(params, gb, rng))
    np.testing.assert_array_equal(seen["causal"], ~parallel_rows)
    inputs = batch["tokens"][:, :-1]
    assert (seen["tokens"][parallel_rows] == tok.mask_id).all()
    np.testing.assert_array_equal(seen["tokens"][~parallel_rows], inputs[~parallel_rows])
    assert (inputs[parallel_rows] != tok.mask_id).any()  # the MASK rows were real captions

    # With the step's per-row mask, a later input changes earlier outputs only in the parallel rows.
    apply = jax.jit(lambda t: task.model.apply({"params": params}, gb["image"], t, causal=jnp.asarray(~parallel_rows)))
    built = jnp.asarray(seen["tokens"])
    changed = built.at[:, -1].set(jnp.where(built[:, -1] == tok.bos_id, tok.eos_id, tok.bos_id))
    earlier = np.abs(np.asarray(apply(built) - apply(changed))[:, :-1]).max(axis=(1, 2))
  assert (earlier[parallel_rows] > 1e-4).all(), earlier
  assert (earlier[~parallel_rows] < 1e-6).all(), earlier


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
  assert {"test/vqa_accuracy", "test/perplexity"} <= set(results)
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


def test_vqa_summary_scores_answers_by_the_vqa_rule(data_dir):
  """Per question min(#matching humans / 3, 1) over the leave-one-out subsets of 10 answers, exact
  match after normalisation for fewer than 4; the split's score is the mean over questions."""
  task = build(_cfg(data_dir, "vqa_shapes"), devices=jax.devices()[:1]).task
  records = [("two", ["2"] * 3 + ["3"] * 7),  # 3 of the 9 others match when a "3" is left out, 2 when a "2" is
             ("Yes.", ["yes"] * 10),
             ("red", ["blue", "red sphere"])]
  want = (3 * (2 / 3) + 7 * 1.0) / 10  # 0.9
  out = task.summarize({"loss": 6.0, "tokens": 3.0}, records)
  assert out["vqa_accuracy"] == pytest.approx((want + 1.0 + 0.0) / 3)
  assert out["loss"] == 2.0 and out["perplexity"] == pytest.approx(np.exp(2.0))
