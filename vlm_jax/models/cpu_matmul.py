"""The CPU matmul kernel (`cpu_matmul.cc`) as a `dot_general`, with its custom VJP.

`matmul(a, b, trans_a, trans_b)` is op(a) @ op(b) on 2-D float32 arrays (op transposes when
asked) in one XLA FFI custom call; its gradients are the same call with other transpose flags,
so no transposed copy of an activation is ever made. `dot_general(lhs, rhs, dims, ...)` takes the
signature flax's Dense and `jnp.einsum` use: a product without batch axes whose contracting axes
are leading or trailing on each operand (every projection of a transformer) runs on the kernel;
anything else, and any product under a multi-device mesh, goes to `lax.dot_general`.
`unavailable()` says why the kernel cannot run here (None when it can).
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vlm_jax.models import cpu_kernels

_BUILD = "matmul_float32"


def unavailable() -> Optional[str]:
  return cpu_kernels.unavailable(_BUILD)


def _call(a, b, trans_a: bool, trans_b: bool):
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  call = jax.ffi.ffi_call(cpu_kernels.target(_BUILD, "VlmMatmulF32"), jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method="sequential")
  return call(a, b, trans_a=np.int32(trans_a), trans_b=np.int32(trans_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(a, b, trans_a: bool = False, trans_b: bool = False):
  """op(a) @ op(b) for 2-D float32 a, b."""
  return _call(a, b, trans_a, trans_b)


def _matmul_fwd(a, b, trans_a, trans_b):
  return _call(a, b, trans_a, trans_b), (a, b)


def _matmul_bwd(trans_a, trans_b, res, g):
  a, b = res
  # c = op(a) op(b): d op(a) = g op(b)^T and d op(b) = op(a)^T g, each transposed back when the
  # operand was stored transposed.
  da = _call(b, g, trans_b, True) if trans_a else _call(g, b, False, not trans_b)
  db = _call(g, a, True, trans_a) if trans_b else _call(a, g, not trans_a, False)
  return da, db


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _transposed(ndim: int, contracting, leading_means_transposed: bool) -> Optional[bool]:
  """Whether an operand with these contracting axes reads as its 2-D matrix transposed, when they
  are a contiguous run at the start or the end (else None). For the left operand the natural
  layout is [free, k]; for the right one [k, free]."""
  c = tuple(contracting)
  if c == tuple(range(len(c))):
    return leading_means_transposed
  if c == tuple(range(ndim - len(c), ndim)):
    return not leading_means_transposed
  return None


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general` that runs on the kernel where it applies (see the module docstring)."""
  (lc, rc), (lb, rb) = dimension_numbers
  ta = _transposed(lhs.ndim, lc, leading_means_transposed=True)
  tb = _transposed(rhs.ndim, rc, leading_means_transposed=False)
  fits = (not lb and not rb and ta is not None and tb is not None and lc and list(lc) == sorted(lc)
          and list(rc) == sorted(rc) and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and preferred_element_type in (None, jnp.float32) and not cpu_kernels.multi_device())
  if not fits:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kw)
  k = math.prod(lhs.shape[i] for i in lc)
  lfree = [lhs.shape[i] for i in range(lhs.ndim) if i not in lc]
  rfree = [rhs.shape[i] for i in range(rhs.ndim) if i not in rc]
  m, n = math.prod(lfree), math.prod(rfree)
  a = lhs.reshape((k, m) if ta else (m, k))
  b = rhs.reshape((n, k) if tb else (k, n))
  return matmul(a, b, ta, tb).reshape(tuple(lfree) + tuple(rfree))
