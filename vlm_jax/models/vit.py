"""Vision Transformer: patch embedding, pre-LN encoder, pooling (cls / gap / map), optional head.

Layout follows ViT/big_vision and maps one-to-one onto Hugging Face ViT / SigLIP vision models:
patch embedding as a stride-p conv (kernel [p, p, C, D], HWIO), learned position embedding over
the patch grid (plus a class-token row first when `pool == "cls"`), optionally a LayerNorm on the
embeddings (`pre_norm`, CLIP's `pre_layrnorm`), pre-LN blocks, final LayerNorm, then pooling.
`resize_posemb` interpolates a position embedding to another grid when a checkpoint trained at
one resolution initialises a model at another.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models.layers import (BTD, AttentionFn, EncoderBlock, Mlp, MultiHeadAttention, constrain, layer_norm,
                                   logical, stack_layers)
from vlm_jax.models.precision import conv_general_dilated

Dtype = Any
POOLS = ("cls", "gap", "map", "none")


class Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  scan_layers: bool = True
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32
  attention_fn: AttentionFn = None
  last_queries: int = 0  # >0: the last block outputs only the first last_queries tokens (unrolled only)

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout, ln_eps=self.ln_eps,
              gelu_approximate=self.gelu_approximate, deterministic=deterministic, dtype=self.dtype,
              param_dtype=self.param_dtype, dtype_mm=self.dtype_mm, attention_fn=self.attention_fn)
    last = {"queries": self.last_queries} if self.last_queries else None
    x, _ = stack_layers(EncoderBlock, self.depth, self.scan_layers, self.remat)(kw, last_kwargs=last)(x)
    return layer_norm(self.ln_eps, self.dtype, self.param_dtype, "norm")(x)


class PatchEmbed(nn.Module):
  """images [B, H, W, C] -> [B, H/p, W/p, width]: a stride-p, VALID p x p convolution with
  `nn.Conv`'s parameters (kernel [p, p, C, width] HWIO, bias [width]) held directly, so they sit at
  `embedding/kernel` and `embedding/bias`; with dtype_mm bf16 its operands are bf16, accumulated in f32."""
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, c = self.patch_size, images.shape[-1]
    kernel = self.param("kernel", logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                        (p, p, c, self.width), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), (self.width,), self.param_dtype)
    y = conv_general_dilated(self.dtype_mm)(images.astype(self.dtype), kernel.astype(self.dtype), (p, p), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens (SigLIP's head)."""
  num_heads: int
  mlp_dim: int
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32
  attention_fn: AttentionFn = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dtype_mm=self.dtype_mm)
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, x.shape[-1]), self.param_dtype)
    probe = jnp.tile(probe.astype(self.dtype), (x.shape[0], 1, 1))
    x = MultiHeadAttention(self.num_heads, name="attn", attention_fn=self.attention_fn, **mm)(probe, context=x)
    y = layer_norm(self.ln_eps, name="ln", **kw)(x)
    x = x + Mlp(self.mlp_dim, gelu_approximate=self.gelu_approximate, name="mlp", **mm)(y)
    return x[:, 0]


class ViT(nn.Module):
  """images [B, H, W, C] -> (logits or pooled features, {"tokens", "pooled"})."""
  num_classes: int = 0  # 0: no head, returns the pooled representation
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool: str = "cls"
  dropout: float = 0.0
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  scan_layers: bool = True
  remat: str = "none"
  head_zero_init: bool = True
  pre_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32  # matmul operands (see models.precision)
  attention_fn: AttentionFn = None  # see layers.MultiHeadAttention
  # Set by callers that read only the pooled output or logits (the classification task, the
  # two-tower model): with pool="cls" and unrolled layers the last block then runs the class token
  # alone through its attention queries and MLP (keys and values still come from every token), the
  # same logits and gradients for 1/T of that block's query-side work; aux["tokens"] is then [B, 1, D].
  pooled_only: bool = False

  def prunes_last_layer(self) -> bool:
    """Whether the last block computes the class token's output alone (see `pooled_only`)."""
    return self.pooled_only and self.pool == "cls" and not self.scan_layers and self.depth > 0

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = PatchEmbed(self.width, p, name="embedding", dtype_mm=self.dtype_mm, **kw)(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.pool == "cls":
      cls = self.param("cls", logical(nn.initializers.zeros, (None, None, "embed")), (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x], axis=1)
    pos = self.param("pos_embedding", logical(nn.initializers.normal(0.02), (None, "length", "embed")),
                     (1, x.shape[1], d), self.param_dtype)
    x = constrain(x + pos.astype(self.dtype), BTD)
    if self.pre_norm:
      x = layer_norm(self.ln_eps, name="pre_norm", **kw)(x)
    x = nn.Dropout(self.dropout)(x, not train)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout, self.ln_eps, self.gelu_approximate,
                self.scan_layers, self.remat, name="encoder", dtype_mm=self.dtype_mm,
                attention_fn=self.attention_fn, last_queries=int(self.prunes_last_layer()), **kw)(x, not train)
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "gap":
      pooled = x.mean(axis=1)
    elif self.pool == "map":
      pooled = MAPHead(self.num_heads, self.mlp_dim, self.ln_eps, self.gelu_approximate, name="map_head",
                       dtype_mm=self.dtype_mm, attention_fn=self.attention_fn, **kw)(x)
    else:
      pooled = x
    aux = {"tokens": x, "pooled": pooled}
    if not self.num_classes:
      return pooled, aux
    init = nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
    logits = nn.Dense(self.num_classes, name="head", kernel_init=logical(init, ("embed", "classes")),
                      bias_init=logical(nn.initializers.zeros, ("classes",)), **kw)(pooled)
    return logits, aux


def resize_posemb(posemb: np.ndarray, new_len: int, num_prefix: int) -> np.ndarray:
  """Bilinearly resizes a [1, prefix + g*g, D] position embedding to [1, prefix + G*G, D].

  The first `num_prefix` rows (the class token's) are kept as they are.
  """
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  old, new = int(round(np.sqrt(grid.shape[0]))), int(round(np.sqrt(new_len - num_prefix)))
  if old * old != grid.shape[0] or new * new != new_len - num_prefix:
    raise ValueError(f"position embedding of {grid.shape[0]} grid rows cannot be resized to {new_len - num_prefix}")
  if old == new:
    return posemb
  grid = grid.reshape(old, old, -1)
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), method="bilinear")
  return np.concatenate([prefix, np.asarray(grid).reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)
