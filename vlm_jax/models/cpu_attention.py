"""The fused CPU attention kernel (`cpu_attention.cc`): build, registration, and its custom VJP.

`attention(q, k, v, scale, causal, precision)` computes `softmax(q k^T * scale) v` for
q [B, Tq, H, D] and k, v [B, Tk, H, D] in two XLA FFI custom calls (forward, backward), in one of
two builds of the kernel (`PRECISIONS`):

- "bfloat16": bf16 matmul operands with f32 accumulation, the numerics of `dtype_mm="bfloat16"`;
  needs a CPU with AVX512_BF16.
- "float32": f32 matmuls, the numerics of `dtype_mm="float32"`; needs AVX2 and FMA.

`models.cpu_kernels` compiles and registers each build on first use; `unavailable(precision)` says
why it cannot be used here (None when it can); `layers.MultiHeadAttention` picks it through the
model's `attention` setting.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import cpu_kernels

PRECISIONS = ("bfloat16", "float32")


def unavailable(precision: str = "bfloat16") -> Optional[str]:
  """None if the `precision` build of the kernel can run here, else why not (naming the fix)."""
  reason = cpu_kernels.unavailable(f"attention_{precision}")
  return f"{reason}; use attention='xla'" if reason else None


def _fwd_call(q, k, v, scale, causal, precision):
  b, tq, h, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tq), jnp.float32))
  call = jax.ffi.ffi_call(cpu_kernels.target(f"attention_{precision}", "VlmAttentionFwd"), out,
                          vmap_method="sequential")
  return call(q, k, v, scale=np.float32(scale), causal=np.int32(causal))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def attention(q, k, v, scale: float, causal: bool = False, precision: str = "bfloat16"):
  """softmax(q k^T * scale) v over [B, T, H, D] arrays (keys j > query i masked when causal), with
  the matmuls of `precision` ("bfloat16" or "float32")."""
  return _fwd_call(q, k, v, scale, causal, precision)[0]


def _attention_fwd(q, k, v, scale, causal, precision):
  out, lse = _fwd_call(q, k, v, scale, causal, precision)
  return out, (q, k, v, lse)


def _attention_bwd(scale, causal, precision, res, g):
  q, k, v, lse = res
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  call = jax.ffi.ffi_call(cpu_kernels.target(f"attention_{precision}", "VlmAttentionBwd"), shapes,
                          vmap_method="sequential")
  return tuple(call(q, k, v, lse, g.astype(q.dtype), scale=np.float32(scale), causal=np.int32(causal)))


attention.defvjp(_attention_fwd, _attention_bwd)
