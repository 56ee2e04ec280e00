"""A transformer MLP, fc2(gelu(fc1(x))), on the CPU matmul kernel with the exact GELU folded into
its products (`cpu_matmul.cc`): the forward's fc1 product adds the bias and applies GELU to each
block of its result while the block is in cache (returning h and gelu(h)), and the backward's
fc2 input-gradient product multiplies by gelu'(h) the same way, so no separate pass over the
[tokens, hidden] activations remains. `mlp(x, w1, b1, w2, b2)` takes x [tokens, d] in float32;
`unavailable()` is the matmul kernel's (None when it can run here).
"""

import jax
import jax.numpy as jnp

from vlm_jax.models import cpu_kernels, cpu_matmul
from vlm_jax.models.cpu_matmul import _BUILD, matmul

unavailable = cpu_matmul.unavailable  # the same build


def _bias_gelu(x, w, b):
  m, n = x.shape[0], w.shape[1]
  out = jax.ShapeDtypeStruct((m, n), jnp.float32)
  call = jax.ffi.ffi_call(cpu_kernels.target(_BUILD, "VlmMatmulBiasGeluF32"), (out, out), vmap_method="sequential")
  return call(x, w, b)


def _gelu_grad(dy, w2, h):
  call = jax.ffi.ffi_call(cpu_kernels.target(_BUILD, "VlmMatmulGeluGradF32"), jax.ShapeDtypeStruct(h.shape, jnp.float32),
                          vmap_method="sequential")
  return call(dy, w2, h)


def _mlp_fwd(x, w1, b1, w2, b2):
  h, a = _bias_gelu(x, w1, b1)
  return matmul(a, w2) + b2, (x, w1, w2, h, a)


@jax.custom_vjp
def mlp(x, w1, b1, w2, b2):
  """gelu(x @ w1 + b1) @ w2 + b2 for x [tokens, d], w1 [d, hidden], w2 [hidden, d] (float32)."""
  return _mlp_fwd(x, w1, b1, w2, b2)[0]


def _mlp_bwd(res, dy):
  x, w1, w2, h, a = res
  dh = _gelu_grad(dy, w2, h)  # (dy w2^T) * gelu'(h)
  return (matmul(dh, w1, False, True), matmul(x, dh, True, False), dh.sum(0),
          matmul(a, dy, True, False), dy.sum(0))


mlp.defvjp(_mlp_fwd, _mlp_bwd)
