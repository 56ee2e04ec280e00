"""Vision-language models built from the towers: `Captioner` (ViT encoder + text Decoder) and
`TwoTower` (ViT + TextEncoder into one embedding space, for contrastive training).

`Captioner` is the CapPa-style encoder-decoder used for captioning and VQA (a question is a
prompt the decoder continues). Its params are `{"img": ViT params, "txt": Decoder params}`.
Decoding loops (`vlm_jax.decode`) call `encode` once and then `decode(..., decode=True)` with the
"cache" collection mutable.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import logical
from vlm_jax.models.precision import dot_general
from vlm_jax.models.text import Decoder, TextEncoder
from vlm_jax.models.vit import ViT


class Captioner(nn.Module):
  """images [B, H, W, C], tokens [B, T] -> logits [B, T, vocab].

  encoder: ViT keyword arguments (width, depth, patch_size, ...). `num_classes` is forced to 0;
    `pool` defaults to "none" (patch tokens only) and may be "cls" (the class token is then one
    of the tokens the decoder attends to).
  decoder: Decoder keyword arguments (vocab_size is required).
  """
  encoder: Optional[Mapping[str, Any]] = None
  decoder: Optional[Mapping[str, Any]] = None

  def setup(self):
    enc = dict(self.encoder or {})
    enc["num_classes"] = 0
    enc.setdefault("pool", "none")
    if enc["pool"] not in ("none", "cls"):
      raise ValueError(f"Captioner encoder pool must be 'none' or 'cls', got {enc['pool']!r}")
    dec = dict(self.decoder or {})
    if "vocab_size" not in dec:
      raise ValueError("Captioner decoder needs vocab_size")
    self.img = ViT(**enc)
    self.txt = Decoder(**dec)

  @property
  def text_max_len(self) -> int:
    """Longest token sequence (prompt + answer) the decoder's position embedding covers."""
    return int(dict(self.decoder or {}).get("max_len", Decoder.max_len))

  def encode(self, images, train: bool = False):
    """images -> encoder tokens [B, N, De] (after the encoder's final LayerNorm)."""
    _, aux = self.img(images, train=train)
    return aux["tokens"]

  def decode(self, tokens, encoded, *, causal: bool = True, decode: bool = False, train: bool = False):
    """Decoder logits for `tokens` given encoder tokens; `decode=True` uses/extends the KV cache."""
    return self.txt(tokens, encoded, causal=causal, decode=decode, deterministic=not train)

  def __call__(self, images, tokens, *, causal: bool = True, train: bool = False):
    return self.decode(tokens, self.encode(images, train=train), causal=causal, train=train)


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class TwoTower(nn.Module):
  """images [B, H, W, C], tokens [B, T] -> (image embeddings [B, E], text embeddings [B, E]), unit norm.

  Params: `img` (ViT, no classifier), `txt` (TextEncoder), optional projections `img_proj` /
  `txt_proj` ([width, E] Dense, bias if `proj_bias`), the learnable `logit_scale` (logits are
  cos * exp(logit_scale)) and, with `logit_bias_init` set, `logit_bias` (SigLIP). The heads sit
  outside `img/` and `txt/`, so a locked tower (`optimizer.freeze="^txt/"`) still trains its head.
  Hugging Face layouts: SigLIP is `image_proj=False` (the MAP head's output is the embedding,
  E = image width), text `pool="last_position"` and `text_proj=True, proj_bias=True` (HF's text
  `head`); CLIP is image `pool="cls", pre_norm=True`, text `causal=True, pool="last"` and both
  projections without bias.
  """
  image: Optional[Mapping[str, Any]] = None
  text: Optional[Mapping[str, Any]] = None
  embed_dim: int = 0  # 0: the image tower's width
  image_proj: bool = False
  text_proj: bool = True
  proj_bias: bool = True
  logit_scale_init: float = 2.302585  # log(10)
  logit_bias_init: Optional[float] = -10.0  # None: no bias (CLIP)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dtype_mm: Any = jnp.float32  # the projections' matmuls; the towers take theirs from image/text

  def setup(self):
    img = dict(self.image or {})
    img["num_classes"] = 0
    if img.get("pool", "cls") == "none":
      raise ValueError("TwoTower image pool must be 'cls', 'gap' or 'map', not 'none'")
    txt = dict(self.text or {})
    if "vocab_size" not in txt:
      raise ValueError("TwoTower text tower needs vocab_size")
    self.img = ViT(**{"pooled_only": True, **img})  # the towers' pooled outputs are all that is read
    self.txt = TextEncoder(**txt)
    dim = self.embed_dim or int(img.get("width", ViT.width))
    for which, cfg, cls, proj in (("image", img, ViT, self.image_proj), ("text", txt, TextEncoder, self.text_proj)):
      width = int(cfg.get("width", cls.width))
      if not proj and width != dim:
        raise ValueError(f"the {which} tower has width {width} but embed_dim is {dim}: set {which}_proj=True")
    dense = lambda name: nn.Dense(dim, use_bias=self.proj_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                                  dot_general=dot_general(self.dtype_mm), name=name,
                                  kernel_init=logical(nn.initializers.lecun_normal(), ("embed", None)),
                                  bias_init=logical(nn.initializers.zeros, (None,)))
    self.img_proj = dense("img_proj") if self.image_proj else None
    self.txt_proj = dense("txt_proj") if self.text_proj else None
    self.logit_scale = self.param("logit_scale", logical(nn.initializers.constant(self.logit_scale_init), ()),
                                  (), jnp.float32)
    self.logit_bias = None
    if self.logit_bias_init is not None:
      self.logit_bias = self.param("logit_bias", logical(nn.initializers.constant(self.logit_bias_init), ()),
                                   (), jnp.float32)

  def encode_image(self, images, train: bool = False, locked: bool = False):
    """`locked`: the tower runs in eval mode and passes no gradient (LiT); its head still trains."""
    pooled, _ = self.img(images, train=train and not locked)
    pooled = jax.lax.stop_gradient(pooled) if locked else pooled
    return l2_normalize(self.img_proj(pooled) if self.img_proj is not None else pooled)

  def encode_text(self, tokens, train: bool = False, locked: bool = False):
    pooled, _ = self.txt(tokens, deterministic=not train or locked)
    pooled = jax.lax.stop_gradient(pooled) if locked else pooled
    return l2_normalize(self.txt_proj(pooled) if self.txt_proj is not None else pooled)

  def temperature(self):
    """(logit_scale, logit_bias): logits = cos * exp(logit_scale) + logit_bias (bias 0 without one)."""
    return self.logit_scale, (self.logit_bias if self.logit_bias is not None else jnp.zeros((), jnp.float32))

  def __call__(self, images, tokens, train: bool = False, locked: tuple = ()):
    """`locked` names towers ("img", "txt") that are frozen: see `encode_image`."""
    return self.encode_image(images, train, "img" in locked), self.encode_text(tokens, train, "txt" in locked)
