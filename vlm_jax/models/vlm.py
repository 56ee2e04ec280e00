"""Vision-language models built from the towers: `Captioner` (ViT encoder + text Decoder).

`Captioner` is the CapPa-style encoder-decoder used for captioning and VQA (a question is a
prompt the decoder continues). Its params are `{"img": ViT params, "txt": Decoder params}`.
Decoding loops (`vlm_jax.decode`) call `encode` once and then `decode(..., decode=True)` with the
"cache" collection mutable.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn

from vlm_jax.models.text import Decoder
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
