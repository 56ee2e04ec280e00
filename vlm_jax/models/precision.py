"""Matmul precision: the `dot_general` every layer uses, picked by the model's `dtype_mm`.

`dtype_mm="float32"` is plain `lax.dot_general`. `dtype_mm="bfloat16"` (big_vision's `dtype_mm`)
multiplies bf16 operands and accumulates in f32, forward and backward: activations, layer norms,
softmax and the optimizer stay in the compute dtype, only the matmul inputs are rounded. The
product comes back in the operands' own (promoted) dtype, so `dtype_mm` changes no other dtype.

XLA:CPU runs a bf16 x bf16 -> f32 dot on AVX512_BF16 / AMX at about twice the f32 rate, but only
when both operands are row-major with the contraction innermost on the left and outermost on the
right. Autodiff's transposed dots (weight gradients contract over the batch axes) miss that fast
path, and XLA folds a plain `transpose` into a column-major layout, which misses it too (the dot
is then upcast to f32). So the custom VJP here lays out every operand itself (`_row_major`) and
returns gradients in the operands' dtypes.
"""

import math
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vlm_jax.models import cpu_kernels, cpu_matmul

MM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# How f32 matmuls (dtype_mm="float32") and f32 LayerNorms run: "auto" on the CPU kernels
# (`models.cpu_matmul`, with the MLPs' exact GELU folded in by `models.cpu_mlp`, and
# `models.cpu_norm`) on x86-64 CPUs with AVX2 + FMA and without AVX-512, else
# XLA's; "xla": always XLA's; "cpu_fused": always the kernels (an error naming the cause if this
# machine cannot run them). bf16 matmuls always use XLA's dot. Under a multi-device mesh the
# kernels step aside for XLA (they have no sharding rule).
MATMUL = ("auto", "xla", "cpu_fused")


def cpu_kernels_on(matmul: str, unavailable: Callable[[], Optional[str]], what: str) -> bool:
  """Whether the `matmul` setting (MATMUL) picks the CPU kernel whose `unavailable()` says why it
  cannot run here (None when it can; called, and the kernel built, only when needed); `what` names
  the kernel's job in the error of an impossible 'cpu_fused'."""
  if matmul not in MATMUL:
    raise ValueError(f"matmul={matmul!r} is not one of {MATMUL}")
  if matmul == "xla":
    return False
  reason = unavailable()
  if matmul == "cpu_fused" and reason:
    raise ValueError(f"{reason} (model.matmul='cpu_fused' for the {what}; set it to 'auto' or 'xla')")
  # auto: only where measured faster. On AVX-512 CPUs XLA has 512-bit FMAs, and the kernels,
  # written for AVX2, were not measured against it.
  return not reason and (matmul == "cpu_fused" or "avx512f" not in cpu_kernels.cpu_flags())


def _row_major(x, perm: Sequence[int]):
  """x transposed by `perm` into a new row-major array (a reshape around the transpose keeps XLA
  from turning it into a layout change)."""
  perm = tuple(perm)
  if perm == tuple(range(x.ndim)):
    return x
  y = jnp.transpose(x[..., None], perm + (x.ndim,))
  return y.reshape(y.shape[:-1])


def _free(ndim, contracting, batch):
  """The axes of an operand that are neither contracted nor batched, in order."""
  return [i for i in range(ndim) if i not in contracting and i not in batch]


def _dot(a, b, dims):
  """dot_general(a, b, dims) with f32 accumulation, as one [B, M, K] x [B, K, N] (or 2-D) dot on
  row-major operands; the result has dot_general's usual order [batch, a free, b free]. Merging the
  axes also keeps XLA from folding the transposes back into the dot."""
  (ac, bc), (ab, bb) = dims
  a_free, b_free = _free(a.ndim, ac, ab), _free(b.ndim, bc, bb)
  batch = [a.shape[i] for i in ab]
  m, k, n = (math.prod(a.shape[i] for i in a_free), math.prod(a.shape[i] for i in ac),
             math.prod(b.shape[i] for i in b_free))
  lead = (math.prod(batch),) if ab else ()
  out_shape = tuple(batch) + tuple(a.shape[i] for i in a_free) + tuple(b.shape[i] for i in b_free)
  a = _row_major(a, list(ab) + a_free + list(ac)).reshape(lead + (m, k))
  b = _row_major(b, list(bb) + list(bc) + b_free).reshape(lead + (k, n))
  nb = len(lead)
  out = lax.dot_general(a, b, (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb)))),
                        preferred_element_type=jnp.float32)
  return out.reshape(out_shape)


def _grad_lhs(g, b, a_ndim, dims):
  """d(lhs) = g . b^T over b's free axes, returned in lhs's axis order."""
  (ac, bc), (ab, bb) = dims
  a_free, b_free = _free(a_ndim, ac, ab), _free(b.ndim, bc, bb)
  nb = len(ab)
  g_bfree = list(range(nb + len(a_free), g.ndim))
  out = _dot(g, b, ((g_bfree, b_free), (list(range(nb)), list(bb))))
  # out: [batch, a_free, b's contracting axes in b's order]; map them back to lhs axes.
  order = list(ab) + a_free + [ac[list(bc).index(i)] for i in sorted(bc)]
  return jnp.transpose(out, tuple(np.argsort(order)))


def _grad_rhs(g, a, b_ndim, dims):
  """d(rhs) = a^T . g over a's free axes, returned in rhs's axis order (a is the left operand so
  that its contracting axes come out first, as the weight layout wants)."""
  (ac, bc), (ab, bb) = dims
  a_free, b_free = _free(a.ndim, ac, ab), _free(b_ndim, bc, bb)
  nb = len(ab)
  g_afree = list(range(nb, nb + len(a_free)))
  out = _dot(a, g, ((a_free, g_afree), (list(ab), list(range(nb)))))
  order = list(bb) + [bc[list(ac).index(i)] for i in sorted(ac)] + b_free
  return jnp.transpose(out, tuple(np.argsort(order)))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_dot(a, b, dims):
  return _bf16_dot_fwd(a, b, dims)[0]


def _bf16_dot_fwd(a, b, dims):
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  out = _dot(a16, b16, dims).astype(jnp.result_type(a, b))
  # Zero-size arrays carry the operands' dtypes (residuals must be arrays).
  return out, (a16, b16, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _bf16_dot_bwd(dims, res, g):
  a16, b16, a_dtype, b_dtype = res
  g16 = g.astype(jnp.bfloat16)
  return (_grad_lhs(g16, b16, a16.ndim, dims).astype(a_dtype.dtype),
          _grad_rhs(g16, a16, b16.ndim, dims).astype(b_dtype.dtype))


_bf16_dot.defvjp(_bf16_dot_fwd, _bf16_dot_bwd)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **unused):
  """`lax.dot_general` with bf16 operands and f32 accumulation (signature as flax/jnp.einsum call it)."""
  del precision, unused
  (lc, rc), (lb, rb) = dimension_numbers
  out = _bf16_dot(lhs, rhs, ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))))
  return out if preferred_element_type is None else out.astype(preferred_element_type)


def dot_general(dtype_mm, matmul: str = "auto") -> Callable:
  """The dot_general for a `dtype_mm` (a name from MM_DTYPES or a dtype) and a `matmul` setting
  (MATMUL)."""
  name = jnp.dtype(dtype_mm).name
  if name not in MM_DTYPES:
    raise ValueError(f"dtype_mm must be one of {sorted(MM_DTYPES)}, got {name!r}")
  if name == "bfloat16":
    if matmul not in MATMUL:
      raise ValueError(f"matmul={matmul!r} is not one of {MATMUL}")
    if matmul == "cpu_fused":
      raise ValueError("model.matmul='cpu_fused' runs float32 matmuls only, but dtype_mm is bfloat16; set "
                       "matmul to 'auto' or 'xla'")
    return bf16_dot_general
  return cpu_matmul.dot_general if cpu_kernels_on(matmul, cpu_matmul.unavailable, "matmuls") else lax.dot_general
