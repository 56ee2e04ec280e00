"""Text towers: `Decoder` (captioning / VQA, cross-attends to image tokens) and `TextEncoder`.

`Decoder` is a GPT-2-style pre-LN transformer, laid out so that it maps one-to-one onto Hugging
Face `GPT2LMHeadModel(add_cross_attention=True)` (see `vlm_jax.hf.gpt2`): token embedding
[vocab, D], learned position embedding [max_len, D] (no embedding scaling), blocks of
ln1 -> causal self-attention -> ln_cross -> cross-attention -> ln2 -> MLP, final LayerNorm,
output head tied to the token embedding or a separate bias-free [D, vocab] kernel. Encoder
tokens of another width go through `enc_proj` first (HF's `enc_to_dec_proj`). With
`decode=True` the attention layers keep a KV cache (see `layers.MultiHeadAttention`), and the
position embedding is read at the cached position.

`TextEncoder` is the text tower of a two-tower model: token + position embeddings, pre-LN blocks
(bidirectional with a padding mask, or causal), final LayerNorm, pooled at the last non-pad
token (`last`: the EOS of `[BOS] text [EOS] pad...`, CLIP's pooling), the last position whatever
it holds (`last_position`: SigLIP's, inputs padded to a fixed length), the first token, or the
mean of the non-pad tokens. `layout="bert"` is a BERT encoder instead (HF `BertModel`, see
`vlm_jax.hf.bert`): embeddings plus the type-0 token-type embedding, embedding LayerNorm
(`embed_norm`), post-LN blocks, no final LayerNorm; the default pre-LN names are unchanged.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import (BTD, AttentionFn, EncoderBlock, Mlp, MultiHeadAttention, constrain, layer_norm,
                                   logical, stack_layers)

Dtype = Any
TEXT_POOLS = ("last", "last_position", "first", "mean")
TEXT_LAYOUTS = ("pre_ln", "bert")


def _token_embed(vocab_size, width, dtype, param_dtype):
  return nn.Embed(vocab_size, width, dtype=dtype, param_dtype=param_dtype, name="token_embed",
                  embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")))


def _pos_embed(module, max_len, width, param_dtype):
  return module.param("pos_embedding", logical(nn.initializers.normal(0.02), ("length", "embed")),
                      (max_len, width), param_dtype)


class DecoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  max_len: int
  dropout: float = 0.0
  ln_eps: float = 1e-5
  gelu_approximate: bool = True
  causal: bool = True
  decode: bool = False
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32
  attention_fn: AttentionFn = None

  @nn.compact
  def __call__(self, x, encoded, self_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dtype_mm=self.dtype_mm)
    drop = lambda y: nn.Dropout(self.dropout)(y, self.deterministic)
    x = constrain(x, BTD)
    y = layer_norm(self.ln_eps, name="ln1", **kw)(x)
    y = MultiHeadAttention(self.num_heads, name="self_attn", attention_fn=self.attention_fn, **mm)(
        y, mask=self_mask, deterministic=self.deterministic, causal=self.causal, decode=self.decode,
        cache_len=self.max_len)
    x = x + drop(y)
    y = layer_norm(self.ln_eps, name="ln_cross", **kw)(x)
    y = MultiHeadAttention(self.num_heads, name="cross_attn", attention_fn=self.attention_fn, **mm)(
        y, context=encoded, deterministic=self.deterministic, decode=self.decode)
    x = x + drop(y)
    y = layer_norm(self.ln_eps, name="ln2", **kw)(x)
    y = Mlp(self.mlp_dim, gelu_approximate=self.gelu_approximate, name="mlp", **mm)(y, self.deterministic)
    x = x + drop(y)
    return constrain(x, BTD), None


class Decoder(nn.Module):
  """tokens [B, T] int, encoded [B, N, De] -> logits [B, T, vocab] float32.

  `causal=False` lets every position see every other (CapPa parallel prediction); a boolean
  array [B] chooses per example (True: causal), so one batch can mix both objectives. `decode=True`
  (apply with `mutable=["cache"]`) continues from the cached position: the first call creates the
  cache (and projects `encoded` once), later calls may pass `encoded=None`.
  """
  vocab_size: int
  width: int = 512
  depth: int = 6
  num_heads: int = 8
  mlp_dim: int = 2048
  max_len: int = 64
  dropout: float = 0.0
  ln_eps: float = 1e-5
  gelu_approximate: bool = True
  tie_embeddings: bool = True
  scan_layers: bool = True
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32  # matmul operands (see models.precision)
  attention_fn: AttentionFn = None  # see layers.MultiHeadAttention

  @nn.compact
  def __call__(self, tokens, encoded, *, causal: bool = True, decode: bool = False, deterministic: bool = True):
    self_mask = None
    if not isinstance(causal, bool):  # per-example choice: causal rows get the triangular mask
      t = tokens.shape[1]
      tril = jnp.tril(jnp.ones((t, t), bool))[None, None]
      self_mask = jnp.logical_or(tril, ~jnp.asarray(causal, bool)[:, None, None, None])
      causal = False
      if decode:
        raise ValueError("decode=True needs causal=True: the KV cache is for autoregressive decoding")
    if decode and not causal:
      raise ValueError("decode=True needs causal=True: the KV cache is for autoregressive decoding")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = tokens.shape[1]
    embed = _token_embed(self.vocab_size, self.width, **kw)
    x = embed(tokens)
    pos = _pos_embed(self, self.max_len, self.width, self.param_dtype)
    if decode:
      if encoded is None and not self.has_variable("cache", "position"):
        raise ValueError("the first decode=True call (which creates the cache) needs encoded")
      index = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      pos = jax.lax.dynamic_slice_in_dim(pos, index.value, t, axis=0)
      index.value = index.value + t
    else:
      if t > self.max_len:
        raise ValueError(f"{t} tokens do not fit the decoder's max_len {self.max_len}")
      pos = pos[:t]
    x = constrain(x + pos.astype(self.dtype)[None], BTD)
    x = nn.Dropout(self.dropout)(x, deterministic)
    if encoded is not None:
      encoded = encoded.astype(self.dtype)
      if encoded.shape[-1] != self.width:
        encoded = nn.Dense(self.width, name="enc_proj", kernel_init=logical(nn.initializers.xavier_uniform(),
                                                                            (None, "embed")),
                           bias_init=logical(nn.initializers.zeros, ("embed",)), **kw)(encoded)
    elif not decode:
      raise ValueError("encoded may be None only in decode=True calls after the first")
    block_kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, max_len=self.max_len, dropout=self.dropout,
                    ln_eps=self.ln_eps, gelu_approximate=self.gelu_approximate, causal=causal, decode=decode,
                    deterministic=deterministic, dtype_mm=self.dtype_mm, attention_fn=self.attention_fn,
                    **kw)
    remat = "none" if decode else self.remat  # nothing to save for a backward pass while decoding
    args = (encoded,) if self_mask is None else (encoded, self_mask)
    x, _ = stack_layers(DecoderBlock, self.depth, self.scan_layers, remat)(block_kw)(x, *args)
    x = layer_norm(self.ln_eps, name="norm", **kw)(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, use_bias=False, name="head",
                        kernel_init=logical(nn.initializers.normal(0.02), ("embed", "vocab")), **kw)(x)
    return constrain(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


class TextEncoder(nn.Module):
  """tokens [B, T] int (right-padded with `pad_id`) -> (pooled [B, D], tokens [B, T, D])."""
  vocab_size: int
  width: int = 512
  depth: int = 6
  num_heads: int = 8
  mlp_dim: int = 2048
  max_len: int = 64
  causal: bool = False
  pool: str = "last"
  pad_id: int = 0
  dropout: float = 0.0
  ln_eps: float = 1e-5
  gelu_approximate: bool = True
  layout: str = "pre_ln"
  type_vocab_size: int = 2  # layout="bert" only
  scan_layers: bool = True
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32  # matmul operands (see models.precision)
  attention_fn: AttentionFn = None  # see layers.MultiHeadAttention

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True):
    if self.pool not in TEXT_POOLS:
      raise ValueError(f"pool must be one of {TEXT_POOLS}, got {self.pool!r}")
    if self.layout not in TEXT_LAYOUTS:
      raise ValueError(f"layout must be one of {TEXT_LAYOUTS}, got {self.layout!r}")
    bert = self.layout == "bert"
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = tokens.shape
    if t > self.max_len:
      raise ValueError(f"{t} tokens do not fit the text encoder's max_len {self.max_len}")
    x = _token_embed(self.vocab_size, self.width, **kw)(tokens)
    x = x + _pos_embed(self, self.max_len, self.width, self.param_dtype)[:t].astype(self.dtype)[None]
    if bert:  # every token has type 0 (single sentences)
      types = self.param("type_embedding", logical(nn.initializers.normal(0.02), (None, "embed")),
                         (self.type_vocab_size, self.width), self.param_dtype)
      x = layer_norm(self.ln_eps, name="embed_norm", **kw)(x + types[0].astype(self.dtype))
    x = nn.Dropout(self.dropout)(constrain(x, BTD), deterministic)
    valid = tokens != self.pad_id
    mask = valid[:, None, None, :]  # keys: padding is never attended to
    if self.causal:
      mask = jnp.logical_and(mask, jnp.tril(jnp.ones((t, t), bool))[None, None])
    block_kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout, ln_eps=self.ln_eps,
                    gelu_approximate=self.gelu_approximate, post_ln=bert, deterministic=deterministic,
                    dtype_mm=self.dtype_mm, attention_fn=self.attention_fn, **kw)
    x, _ = stack_layers(EncoderBlock, self.depth, self.scan_layers, self.remat)(block_kw)(x, mask)
    if not bert:
      x = layer_norm(self.ln_eps, name="norm", **kw)(x)
    if self.pool == "first":
      pooled = x[:, 0]
    elif self.pool == "last_position":
      pooled = x[:, -1]
    elif self.pool == "last":
      last = jnp.max(jnp.where(valid, jnp.arange(t)[None], 0), axis=1)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    else:
      w = valid.astype(x.dtype)[..., None]
      pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1)
    return pooled, x
