"""Pieces shared by tasks: config -> module kwargs, texts -> token arrays."""

import jax.numpy as jnp

from vlm_jax import kernels
from vlm_jax.data.tokenizer import texts
from vlm_jax.errors import UserError
from vlm_jax.models.precision import MM_DTYPES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def module_kwargs(model_cfg, module=None, exclude=()) -> dict:
  """A config's `model` ConfigDict (or a dict) as keyword arguments of the Flax module class
  `module` (dtype names resolved). With `module`, `attention` ("auto" unless set) becomes the
  module's `attention_fn`, chosen by `vlm_jax.kernels` for its dtypes and head dimension."""
  d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  kw = {k: v for k, v in d.items() if k not in exclude}
  for key in ("dtype", "param_dtype", "dtype_mm"):
    if key in kw:
      allowed = MM_DTYPES if key == "dtype_mm" else DTYPES
      if kw[key] not in allowed:
        raise UserError(f"model.{key}='{kw[key]}' is not one of {', '.join(allowed)}.")
      kw[key] = allowed[kw[key]]
  if module is not None:
    get = lambda key: kw.get(key, getattr(module, key))
    head_dim = get("width") // get("num_heads") if get("num_heads") else 0  # the module reports bad heads
    kw["attention_fn"] = kernels.attention_fn(kw.pop("attention", "auto"), dtype=get("dtype"),
                                              dtype_mm=get("dtype_mm"), head_dim=head_dim)
  return kw


def encode_captions(batch: dict, tok, max_len: int, train: bool, stats, key: str = "caption") -> dict:
  """`tokens` [B, max_len]: the first reference of each row's text as [BOS] caption [EOS]; the
  texts are dropped from training batches (evaluation keeps them as references)."""
  first = [t.split("\n")[0] for t in texts(batch, key)]
  batch["tokens"], cut = tok.caption_sequences(first, max_len)
  stats.add(len(first), cut, max_len)
  if train:
    del batch[key]
  return batch


def encode_prompted(batch: dict, tok, max_len: int, train: bool, stats, keys=("question", "answer")) -> dict:
  """`tokens`, `loss_mask` [B, max_len]: [BOS] prompt [SEP] answer [EOS] with the loss on the
  answer and EOS; evaluation batches also get `prompt` (the prefix alone) and keep the texts."""
  prompts, answers = texts(batch, keys[0]), [t.split("\n")[0] for t in texts(batch, keys[1])]
  seq = tok.vqa_sequences(prompts, answers, max_len)
  stats.add(len(prompts), seq.truncated, max_len)
  batch["tokens"], batch["loss_mask"] = seq.tokens, seq.loss_mask
  if train:
    for k in keys:
      del batch[k]
  else:
    batch["prompt"], _ = tok.prompt_sequences(prompts, max_len)
  return batch
