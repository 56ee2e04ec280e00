"""Matmul precision: the `dot_general` every layer uses (and the patch embedding's convolution),
picked by the model's `dtype_mm`.

`dtype_mm="float32"` is plain `lax.dot_general`. `dtype_mm="bfloat16"` (big_vision's `dtype_mm`)
multiplies bf16 operands and accumulates in f32: both operands are cast to bf16, the dot asks for
an f32 result, and the product comes back in the operands' own (promoted) dtype, so activations,
layer norms, softmax and the optimizer keep the compute dtype and `dtype_mm` changes no other
dtype. Autodiff differentiates through the casts (gradients reach each operand in its own dtype).
"""

from typing import Callable

import jax.numpy as jnp
from jax import lax

MM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general` with bf16 operands and f32 accumulation (signature as flax/jnp.einsum call it)."""
  out = lax.dot_general(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers,
                        precision=precision, preferred_element_type=jnp.float32, **kw)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def bf16_conv_general_dilated(lhs, rhs, *args, preferred_element_type=None, **kw):
  """`lax.conv_general_dilated` with bf16 operands and f32 accumulation (as flax's Conv calls it)."""
  out = lax.conv_general_dilated(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), *args,
                                 preferred_element_type=jnp.float32, **kw)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def _bf16(dtype_mm) -> bool:
  name = jnp.dtype(dtype_mm).name
  if name not in MM_DTYPES:
    raise ValueError(f"dtype_mm must be one of {sorted(MM_DTYPES)}, got {name!r}")
  return name == "bfloat16"


def dot_general(dtype_mm) -> Callable:
  """The dot_general for a `dtype_mm` (a name from MM_DTYPES or a dtype)."""
  return bf16_dot_general if _bf16(dtype_mm) else lax.dot_general


def conv_general_dilated(dtype_mm) -> Callable:
  """The conv_general_dilated for a `dtype_mm`, with the same operand and accumulation dtypes."""
  return bf16_conv_general_dilated if _bf16(dtype_mm) else lax.conv_general_dilated
