"""The Hugging Face PyTorch peers `tools/benchmark.py` times our train steps against: a
`ViTForImageClassification` and a `VisionEncoderDecoderModel` (ViT + GPT-2 with cross-attention)
of the same shapes, each with `torch.optim.AdamW`, on CUDA when JAX runs on a GPU and torch has it.
`runs(a, build)` gives {name: run(n) -> seconds for n steps}; `a` is the benchmark's arguments.
"""

import time

import jax
import numpy as np


def runs(a, build):
  """The PyTorch peer's step(s): f32 (what `transformers` trains in by default) and, when our step
  multiplies in bf16 (`--dtype` or `--dtype-mm`), also under bf16 autocast (PyTorch's mixed
  precision: bf16 matmuls, f32 softmax / norms / weights), each on its own model and optimizer."""
  out = {"hf_torch": build(a, False)}
  if "bfloat16" in (a.dtype, a.dtype_mm):
    out["hf_torch_bf16"] = build(a, True)
  return out


def vit(a, batch, autocast=False):
  import torch
  from transformers import ViTConfig, ViTForImageClassification
  dev = _device()
  model = ViTForImageClassification(ViTConfig(hidden_size=a.width, num_hidden_layers=a.depth, num_attention_heads=a.heads,
                                              intermediate_size=4 * a.width, image_size=a.image_size, patch_size=a.patch,
                                              num_labels=1000)).to(dev)
  x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(dev)
  y = torch.from_numpy(batch["label"].astype(np.int64)).to(dev)
  return _loop(model, dev, lambda: model(pixel_values=x, labels=y).loss, autocast)


def captioner(a, batch, autocast=False):
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel
  dev = _device()
  enc = ViTModel(ViTConfig(hidden_size=a.width, num_hidden_layers=a.depth, num_attention_heads=a.heads,
                           intermediate_size=4 * a.width, image_size=a.image_size, patch_size=a.patch),
                 add_pooling_layer=False)
  dec = GPT2LMHeadModel(GPT2Config(n_embd=a.width, n_layer=a.dec_depth, n_head=a.heads, n_inner=4 * a.width,
                                   vocab_size=a.vocab, n_positions=a.text_len, add_cross_attention=True,
                                   is_decoder=True))
  model = VisionEncoderDecoderModel(encoder=enc, decoder=dec).to(dev)
  x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(dev)
  tokens = torch.from_numpy(batch["tokens"].astype(np.int64)).to(dev)

  def loss():
    logits = model(pixel_values=x, decoder_input_ids=tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
  return _loop(model, dev, loss, autocast)


def _device() -> str:
  """Where the peer runs: CUDA when JAX runs on a GPU and this torch has CUDA, else the CPU."""
  import torch
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _loop(model, dev, loss_fn, bf16):
  import torch
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
  autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16)

  def run(n):
    if dev == "cuda":
      torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      with autocast:
        loss = loss_fn()
      loss.backward()
      opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t
  return run
