"""Attention kernels: the one place that maps a config's `model.attention` and this process's
backend to the `attention_fn` the models are handed (see `models.layers.MultiHeadAttention`).

"xla": none (the models' own einsum attention). "cudnn": cuDNN's flash attention through
`jax.nn.dot_product_attention` on a CUDA GPU, for bf16/f16 compute or bf16 matmuls (`dtype_mm`,
whose semantics cuDNN keeps: bf16 products, f32 accumulation and softmax) and a head dimension
that is a multiple of 8 up to 128; anything else is one error naming the cause and the fix.
"auto": cuDNN where "cudnn" would run, XLA elsewhere (and wherever JAX refuses cuDNN a shape).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.layers import xla_attention
from vlm_jax.models.precision import dot_general

ATTENTION = ("auto", "xla", "cudnn")
_FIX = "set model.attention to 'auto' or 'xla'"

# The implementation `jax.nn.dot_product_attention` is asked for on the cuDNN path; tests set "xla"
# (and patch `_backend`) to run the same call, with the same arguments, on a CPU.
_GPU_IMPL = "cudnn"


def _backend() -> str:
  return jax.default_backend()


def attention_fn(choice: str, *, dtype, dtype_mm, head_dim: int) -> Optional[Callable]:
  """The attention_fn for `model.attention=choice` in a model computing in `dtype` with matmuls in
  `dtype_mm` and heads of `head_dim`; None for the models' XLA einsums."""
  if choice not in ATTENTION:
    raise UserError(f"model.attention='{choice}' is not one of {', '.join(ATTENTION)}.")
  if choice == "xla":
    return None
  strict = choice == "cudnn"

  def refuse(why, fix=_FIX):
    if strict:
      raise UserError(f"model.attention='cudnn' {why}; {fix}.")
    return None
  if _backend() != "gpu":
    return refuse(f"needs a CUDA GPU, and this process runs on {_backend()}")
  if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    kernel_dtype = jnp.dtype(dtype)
  elif jnp.dtype(dtype_mm) == jnp.bfloat16:
    kernel_dtype = jnp.dtype(jnp.bfloat16)
  else:
    return refuse(f"computes in bf16 or f16, and this model computes attention in {jnp.dtype(dtype).name}",
                  "set model.dtype or model.dtype_mm to 'bfloat16', or model.attention to 'auto' or 'xla'")
  if head_dim % 8 or head_dim > 128:
    return refuse(f"needs a head dimension that is a multiple of 8 and at most 128, not {head_dim} "
                  f"(width / num_heads)", "change num_heads or " + _FIX)
  return functools.partial(_cudnn_attention, dtype=kernel_dtype, dtype_mm=jnp.dtype(dtype_mm), strict=strict)


def _cudnn_attention(q, k, v, *, scale, causal, dtype, dtype_mm, strict):
  """softmax(q k^T * scale) v for q, k, v [B, T, H, hd] through cuDNN in `dtype`; where JAX says
  cuDNN cannot run it, XLA's einsums (under "auto") or an error (under "cudnn")."""
  try:
    return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), scale=scale,
                                        is_causal=causal, implementation=_GPU_IMPL)
  except (NotImplementedError, RuntimeError) as e:  # no cuDNN, too old a cuDNN, unsupported shape
    if strict:
      raise UserError(f"model.attention='cudnn' cannot run here: {e}; {_FIX}.") from e
    return xla_attention(q, k, v, scale=scale, causal=causal, dot_general=dot_general(dtype_mm))
