"""Analytic FLOP counts of the models, device peak FLOP/s, and the throughput figures of a log line.

`compiled.cost_analysis()` counts the body of a scanned layer stack once, so model FLOPs are
counted here from the architecture instead: matmuls and convolutions only (2 FLOPs per
multiply-add), attention scores and weighted values over the full (unmasked) T x T square as the
hardware computes them. A training step costs 3x the forward pass (backward = 2x forward), except
the patch embedding, whose input (the images) needs no gradient: 2x. Elementwise work (norms,
softmax, GELU, the optimizer) is left out, as in the usual MFU definition.

Peaks: dense bf16 FLOP/s per chip for TPUs and NVIDIA GPUs, looked up by `device_kind`; on CPU the
f32 matmul peak is measured once by a short jitted matmul and split evenly over the local devices
(simulated CPU devices share the cores). `peak_tflops` in the config overrides both.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from vlm_jax.models.text import Decoder, TextEncoder
from vlm_jax.models.vit import ViT

# Dense bf16 peak TFLOP/s per device, matched in order against the lower-cased device_kind.
PEAK_BF16_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0),
    ("v5 lite", 197.0), ("v5e", 197.0),
    ("v5p", 459.0), ("v5", 459.0),
    ("v4", 275.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0), ("h100", 989.0),
    ("a100", 312.0),
)


def _attention(q_len, kv_len, d):
  """Scores (q . k) and weighted values, all heads together."""
  return 4 * q_len * kv_len * d


def _mlp(t, d, hidden):
  return 4 * t * d * hidden


def encoder_layer(t, d, mlp_dim):
  """One pre-LN self-attention block over t tokens: q, k, v, out projections + attention + MLP."""
  return 8 * t * d * d + _attention(t, t, d) + _mlp(t, d, mlp_dim)


def vit_forward(vit, image_size: int) -> tuple[int, int]:
  """(FLOPs of one image's forward pass, of which patch embedding) for a `models.vit.ViT`."""
  grid = image_size // vit.patch_size
  n, d = grid * grid, vit.width
  t = n + (vit.pool == "cls")
  embed = 2 * n * (vit.patch_size ** 2 * 3) * d
  total = embed + vit.depth * encoder_layer(t, d, vit.mlp_dim)
  if vit.prunes_last_layer():  # its last block runs queries, output projection and MLP for one token
    total -= encoder_layer(t, d, vit.mlp_dim) - (4 * t * d * d + 4 * d * d + _attention(1, t, d) + _mlp(1, d, vit.mlp_dim))
  if vit.pool == "map":  # one probe query attends over the t tokens, then an MLP on it
    total += 4 * d * d + 4 * t * d * d + _attention(1, t, d) + _mlp(1, d, vit.mlp_dim)
  if vit.num_classes:
    total += 2 * d * vit.num_classes
  return total, embed


def decoder_forward(dec, length: int, enc_tokens: int, enc_width: int) -> int:
  """One sequence of `length` tokens through a `models.text.Decoder` cross-attending to the image."""
  d = dec.width
  per_layer = (encoder_layer(length, d, dec.mlp_dim)  # self-attention block + MLP
               + 4 * length * d * d + 4 * enc_tokens * d * d + _attention(length, enc_tokens, d))  # cross
  total = dec.depth * per_layer + 2 * length * d * dec.vocab_size
  if enc_width != d:
    total += 2 * enc_tokens * enc_width * d  # enc_proj
  return total


def text_encoder_forward(enc, length: int) -> int:
  """One sequence of `length` tokens through a `models.text.TextEncoder` (no output head)."""
  return enc.depth * encoder_layer(length, enc.width, enc.mlp_dim)


def two_tower_forward(model, image_size: int, length: int, global_batch: int):
  """(forward FLOPs per example, of which patch embedding) for a `models.vlm.TwoTower`: the image
  tower, the text tower, the projections, and the example's row of the contrastive logits: its
  image against all `global_batch` texts (each device computes B_local x B_global of them)."""
  img = ViT(**{"pooled_only": True, **dict(model.image or {}), "num_classes": 0})  # as TwoTower.setup builds it
  txt = TextEncoder(**dict(model.text))
  dim = model.embed_dim or img.width
  total, embed = vit_forward(img, image_size)
  total += text_encoder_forward(txt, length)
  total += 2 * img.width * dim * model.image_proj + 2 * txt.width * dim * model.text_proj
  return total + 2 * global_batch * dim, embed


def captioner_forward(model, image_size: int, length: int) -> tuple[int, int]:
  """(forward FLOPs per example, of which patch embedding) for a `models.vlm.Captioner` whose
  decoder reads `length` tokens (the teacher-forced inputs)."""
  enc = ViT(**{"pool": "none", **dict(model.encoder or {}), "num_classes": 0})  # as Captioner.setup builds it
  dec = Decoder(**dict(model.decoder))
  img, embed = vit_forward(enc, image_size)
  grid = image_size // enc.patch_size
  enc_tokens = grid * grid + (enc.pool == "cls")
  return img + decoder_forward(dec, length, enc_tokens, enc.width), embed


def train_flops(counts):
  """FLOPs of one example's training step (forward + backward) from a task's (forward, input-side)
  counts (`Task.flops`); None where the task has none."""
  return None if counts is None else 3 * counts[0] - counts[1]


def tokens_per_example(batch: dict) -> int:
  """Text positions trained per example (targets of teacher forcing); 0 for image-only tasks."""
  return batch["tokens"].shape[1] - 1 if "tokens" in batch else 0


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, repeats: int = 5, dtype: str = "float32", min_seconds: float = 0.5) -> float:
  """Best matmul FLOP/s of this host over jitted n x n x n products of `dtype` operands accumulated
  in f32 (a bf16 product runs on AVX512_BF16 / AMX where the CPU has them): at least `repeats`
  products and at least `min_seconds` of them, because on a shared host a few products can all
  land in a slow stretch (5 products, 75 ms, once measured half the peak and an MFU above 1)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a))
  best, spent, done = float("inf"), 0.0, 0
  while done < repeats or (spent < min_seconds and done < 200):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    took = time.perf_counter() - t
    best, spent, done = min(best, took), spent + took, done + 1
  return 2 * n ** 3 / best


def peak_flops_per_device(override_tflops: float = 0.0, device=None, dtype_mm: str = "float32"):
  """Peak FLOP/s of one device: the override, the bf16 table, or (CPU) measured for the model's
  matmul operand dtype (`model.dtype_mm`); None if unknown."""
  if override_tflops:
    return override_tflops * 1e12
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return measured_cpu_peak(dtype=jnp.dtype(dtype_mm).name) / jax.local_device_count()
  kind = device.device_kind.lower()
  for key, tflops in PEAK_BF16_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None


@dataclasses.dataclass(frozen=True)
class StepCost:
  """The constants behind a log line's throughput figures: one example's training FLOPs and
  tokens, the devices sharing the batch, and one device's peak FLOP/s (None: unknown, no MFU)."""
  flops_per_example: float
  tokens_per_example: int
  num_devices: int
  peak_flops_per_device: float | None


def throughput(examples_per_s: float, cost: StepCost) -> dict:
  """The figures of a train log line beyond images/s: tokens/s, TFLOP/s per device, MFU."""
  out = {}
  if cost.tokens_per_example:
    out["tokens_per_s"] = examples_per_s * cost.tokens_per_example
  if cost.flops_per_example:
    per_device = examples_per_s * cost.flops_per_example / cost.num_devices
    out["tflops_per_device"] = per_device / 1e12
    if cost.peak_flops_per_device:
      out["mfu"] = per_device / cost.peak_flops_per_device
  return out
