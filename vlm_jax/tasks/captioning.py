"""Captioning and VQA with a CapPa-style encoder-decoder (ViT + cross-attention text decoder).

Captioning (`input.text = "caption"`): teacher-forced cross-entropy on the caption tokens,
padding ignored. With probability `model.masked_pred_prob` an example is trained by CapPa
*parallel prediction*: its decoder inputs are all MASK and its attention is bidirectional, so
the model must predict the whole caption from the image alone (drawn per example with the
step's key; both kinds share one forward pass).
VQA (`input.text = "qa"`) is captioning with a prompt: `[BOS] question [SEP]` is the prefix and
the loss covers only the answer tokens and EOS.

Evaluation decodes every example (`evals.decode`: greedy / beam / sample) and reports
`bleu4`, `cider` (captions) or `vqa_accuracy` (answers), plus teacher-forced `perplexity`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax import decode, flops
from vlm_jax.data import features, tokenizer as tokenizer_lib, tokenizer_source
from vlm_jax.errors import UserError
from vlm_jax.hf import captioner as hf_captioner
from vlm_jax.metrics import caption as caption_metrics, vqa as vqa_metrics
from vlm_jax.models.text import Decoder
from vlm_jax.models.vit import ViT
from vlm_jax.models.vlm import Captioner
from vlm_jax.tasks import base
from vlm_jax.tasks.common import encode_captions, encode_prompted, module_kwargs

MODES = ("caption", "qa")


class Task(base.Task):
  name = "captioning"
  collects_predictions = True  # evaluation gathers the decoded texts of every batch
  prompt_option = "question"
  prompt_help = "Answer this question about each image (VQA) instead of captioning."
  hf_family = hf_captioner
  fixed_mode = None  # subclasses that always read prompt -> answer texts set "qa"

  @classmethod
  def validate(cls, cfg) -> None:
    if cfg.input.get("text", "") not in MODES:
      raise UserError(f"config: input.text='{cfg.input.get('text', '')}' is unknown for task 'captioning'; "
                      f"use 'caption' or 'qa'.")

  @classmethod
  def predict_config(cls, cfg, prompt: str) -> None:
    if prompt:  # a question makes the run answer it (VQA), whichever mode it trained in
      cfg.input.text = "qa"
      cfg.evals.decode_len = cfg.evals.decode_len or 8  # answers are short; keeps prompt + answer in range

  def __init__(self, cfg, data_info):
    inp = cfg.input
    self.cfg, self.mode = cfg, self.fixed_mode or inp.text
    self.tokenizer = self.make_tokenizer(cfg)
    if cfg.init_from and re.search(cfg.init_include, "txt/token_embed/embedding"):
      tokenizer_source.check_same(self.tokenizer, cfg.init_from.split(":")[0],
                           "Set --config.input.tokenizer= to that file (or leave it empty), or exclude "
                           "the text embedding from --config.init_include.")
    self.text_fields = ("caption",) if self.mode == "caption" else ("question", "answer")
    m = cfg.model
    self.masked_pred_prob = float(m.get("masked_pred_prob", 0.0))
    self.decode_len = cfg.evals.decode_len or (inp.max_len - 1)
    shared = {k: m[k] for k in ("dtype", "param_dtype", "dtype_mm", "attention") if k in m}  # compute/param dtypes of both towers
    enc = module_kwargs({**m.encoder.to_dict(), **shared}, ViT)
    dec = module_kwargs({**m.decoder.to_dict(), **shared}, Decoder)
    # Positions must cover the longest prompt (qa: the whole input.max_len row) plus the generated
    # tokens; recipes set model.decoder.max_len so captioning and VQA runs share one shape.
    needed = inp.max_len + (self.decode_len if self.mode == "qa" else 0)
    dec.setdefault("max_len", needed)
    if dec["max_len"] < needed:
      raise UserError(f"model.decoder.max_len={dec['max_len']} is too short: input.max_len={inp.max_len} "
                      f"{'+ evals.decode_len=' + str(self.decode_len) if self.mode == 'qa' else ''} needs {needed}. "
                      f"Raise model.decoder.max_len or lower input.max_len / evals.decode_len.")
    dec["vocab_size"] = self.tokenizer.vocab_size
    self.model = Captioner(encoder=enc, decoder=dec)
    self.decode_options = dict(max_len=self.decode_len, bos_id=self.tokenizer.bos_id,
                               eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
    if cfg.evals.decode == "beam":
      self.decode_options.update(beam_size=cfg.evals.beam_size)
    self.decoder = decode.decode_fn(cfg.evals.decode, **self.decode_options)

  def make_tokenizer(self, cfg):
    """The run's tokenizer (`tokenizer_source.for_run`); subclasses add tokens to it."""
    return tokenizer_source.for_run(cfg)

  def features(self, inp) -> tuple:
    if self.mode == "qa":
      return (features.Label(inp.label_key), features.TextPairs(inp.question_key, inp.answer_key))
    return (features.Label(inp.label_key), features.Texts(inp.caption_key))

  def encode(self, batch: dict, train: bool, stats) -> dict:
    encode = encode_prompted if self.mode == "qa" else encode_captions
    return encode(batch, self.tokenizer, self.cfg.input.max_len, train, stats)

  def predict_inputs(self, images, prompt: str = "") -> dict:
    batch = {"image": images}
    if prompt:
      batch["prompt"], _ = self.tokenizer.prompt_sequences([prompt] * len(images), self.cfg.input.max_len)
    return batch

  def flops(self, example, global_batch):
    return flops.captioner_forward(self.model, example["image"].shape[1], example["tokens"].shape[1] - 1)

  def dummy_batch(self, n: int) -> dict:
    s, L = self.cfg.input.image_size, self.cfg.input.max_len
    return {"image": np.zeros((n, s, s, 3), np.float32), "tokens": np.zeros((n, L), np.int32),
            "loss_mask": np.zeros((n, L - 1), np.int32)}

  def eval_dummy_batch(self, n: int) -> dict:
    batch = super().eval_dummy_batch(n)
    if self.mode == "qa":  # evaluation decodes from the question prompt
      batch["prompt"] = np.zeros((n, self.cfg.input.max_len), np.int32)
    return batch

  def init(self, rng, batch):
    return self.model.init({"params": rng}, batch["image"], batch["tokens"][:, :-1])["params"]

  def _weights(self, batch):
    targets = batch["tokens"][:, 1:]
    if self.mode == "qa":
      return batch["loss_mask"].astype(jnp.float32)
    return (targets != self.tokenizer.pad_id).astype(jnp.float32)

  def _token_losses(self, params, batch, train, rng=None, parallel=None):
    """Per-token losses; `parallel` [B] bool marks examples trained by parallel prediction."""
    inputs = batch["tokens"][:, :-1]
    causal = True
    if parallel is not None:
      inputs = jnp.where(parallel[:, None], self.tokenizer.mask_id, inputs)
      causal = ~parallel
    rngs = {"dropout": rng} if rng is not None else {}
    logits = self.model.apply({"params": params}, batch["image"], inputs, causal=causal, train=train,
                              rngs=rngs).astype(jnp.float32)
    targets = batch["tokens"][:, 1:]
    return self.token_loss(logits, targets, train), logits.argmax(-1) == targets

  def token_loss(self, logits, targets, train: bool):
    """Per-token cross-entropy [B, T] of float32 logits [B, T, V]; subclasses may soften targets."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  def loss_fn(self, params, batch, rng):
    w = self._weights(batch)
    drop_rng, coin = jax.random.split(rng)
    parallel = None
    if self.masked_pred_prob > 0 and self.mode == "caption":
      parallel = jax.random.bernoulli(coin, self.masked_pred_prob, (batch["tokens"].shape[0],))
    losses, correct = self._token_losses(params, batch, True, drop_rng, parallel)
    n = jnp.maximum(w.sum(), 1.0)
    loss = (losses * w).sum() / n
    return loss, {"loss": loss, "token_accuracy": (correct * w).sum() / n}

  def eval_fn(self, params, batch):
    losses, _ = self._token_losses(params, batch, False)
    w = self._weights(batch) * batch["_mask"][:, None].astype(jnp.float32)
    return {"loss": (losses * w).sum(), "tokens": w.sum(), "count": batch["_mask"].sum()}

  def predict_fn(self, params, batch):
    prompt = batch["prompt"] if self.mode == "qa" else None
    return {"tokens": self.decoder(self.model, params, batch["image"], prompt)}

  def format(self, preds, image_sizes=None) -> list:
    return self.tokenizer.decode_batch(np.asarray(preds["tokens"]))

  def collect(self, batch, preds) -> list:
    """Host side: (prediction, references) for every real row of a gathered batch."""
    keep = np.asarray(batch["_mask"]) == 1
    hyps = [h for h, k in zip(self.tokenizer.decode_batch(np.asarray(preds["tokens"])), keep) if k]
    refs_key = "caption" if self.mode == "caption" else "answer"
    refs = [r.split("\n") for r, k in zip(tokenizer_lib.texts(batch, refs_key), keep) if k]
    return list(zip(hyps, refs))

  @staticmethod
  def loss_summary(sums) -> dict:
    """Teacher-forced `loss` per token and its `perplexity` from the evaluation sums."""
    loss = float(sums["loss"]) / max(float(sums["tokens"]), 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}

  def summarize(self, sums, records=()) -> dict:
    out = self.loss_summary(sums)
    if records:
      if self.mode == "caption":
        refs = {i: [caption_metrics.tokenize(r) for r in rs] for i, (_, rs) in enumerate(records)}
        hyps = {i: caption_metrics.tokenize(h) for i, (h, _) in enumerate(records)}
        out["bleu4"] = float(caption_metrics.bleu(refs, hyps)[3])
        out["cider"] = float(caption_metrics.cider(refs, hyps))
      else:
        out["vqa_accuracy"] = float(vqa_metrics.mean_vqa_accuracy([h for h, _ in records], [r for _, r in records]))
    return out

  def draw(self, batch, preds):
    items = []
    for (hyp, refs), img in zip(self.collect(batch, preds), batch["image"]):
      ok = hyp.strip() == refs[0].strip()
      items.append((img, f"{hyp}\nref: {refs[0]}", ok))
    if self.mode == "qa":
      questions = tokenizer_lib.texts(batch, "question")
      items = [(img, f"Q: {q}\nA: {text}", ok) for (img, text, ok), q in zip(items, questions)]
    return items
