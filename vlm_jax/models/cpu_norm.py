"""The CPU LayerNorm kernel (`cpu_norm.cc`) with its custom VJP.

`layer_norm(x, scale, bias, eps)` normalises float32 `x` over its last axis, as `nn.LayerNorm`
does (but with the variance from a second pass over each row), in one XLA FFI call forward and
one backward. `unavailable()` says why the kernel cannot run here (None when it can).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import cpu_kernels

_BUILD = "layer_norm_float32"


def unavailable() -> Optional[str]:
  return cpu_kernels.unavailable(_BUILD)


def _forward(x, scale, bias, eps):
  rows = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
  call = jax.ffi.ffi_call(cpu_kernels.target(_BUILD, "VlmLayerNormFwd"),
                          (jax.ShapeDtypeStruct(x.shape, jnp.float32), rows, rows), vmap_method="sequential")
  return call(x, scale, bias, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis; all float32."""
  return _forward(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  y, mean, rstd = _forward(x, scale, bias, eps)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, res, g):
  x, scale, mean, rstd = res
  d = x.shape[-1]
  call = jax.ffi.ffi_call(cpu_kernels.target(_BUILD, "VlmLayerNormBwd"),
                          (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32),
                           jax.ShapeDtypeStruct((d,), jnp.float32)), vmap_method="sequential")
  return call(x, scale, mean, rstd, g)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
