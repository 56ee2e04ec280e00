"""Shared building blocks: Mlp, MultiHeadAttention, remat policies, logical-axis helpers.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) and large
activations are constrained with `act_*` names; `vlm_jax.parallel.RULES` maps them to the mesh.
Every matmul goes through `precision.dot_general(dtype_mm)` (bf16 operands with f32 accumulation
when `dtype_mm="bfloat16"`), except the Mlp's where `matmul` picks the f32 CPU kernel: there the
whole MLP is one `cpu_mlp.mlp`, its GELU folded into the kernel's products. Attention weights are stored head-major as [embed, heads, head_dim]
(q/k/v) and [heads, head_dim, embed] (output), which maps one-to-one onto Hugging Face's Linear
layers.
MultiHeadAttention also owns the decoding KV cache (flax "cache" collection): self-attention
appends keys/values at `cache_index`; cross-attention projects the context once and reuses it.
Its `attention` setting picks how softmax(q k^T) v runs (`ATTENTION`): XLA's einsums, the fused
CPU kernel of `models.cpu_attention` (matmuls in `dtype_mm`), or cuDNN's flash attention on a CUDA
GPU (`jax.nn.dot_product_attention`, bf16/f16), each for unmasked or causal attention outside
decoding; under a multi-device mesh the CPU kernel runs per shard (`shard_map` over the batch and
head axes) and cuDNN's call is partitioned by JAX's own rules.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import cpu_attention, cpu_kernels, cpu_mlp, cpu_norm
from vlm_jax.models.precision import cpu_kernels_on, dot_general

Dtype = Any

# "auto": on a CUDA GPU cuDNN's flash attention where it applies (bf16/f16 compute or bf16 matmuls,
# head_dim a multiple of 8); on a CPU the fused kernel where this CPU can run it (its bf16 build for
# dtype_mm bf16 on AVX512_BF16, its f32 build for f32 on AVX2 + FMA); else XLA. "xla": always XLA's
# einsums; "cpu_fused" / "cudnn": that kernel wherever it applies (an error naming the cause if this
# machine or dtype cannot run it).
ATTENTION = ("auto", "xla", "cpu_fused", "cudnn")

# The implementation `jax.nn.dot_product_attention` is asked for on the cuDNN path; tests set "xla"
# (and patch `_backend`) to run the same call, with the same arguments, on a CPU.
_GPU_IMPL = "cudnn"

BTD = ("act_batch", "act_length", "act_embed")


def _backend() -> str:
  return jax.default_backend()


def logical(init, names):
  return nn.with_logical_partitioning(init, names)


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy '{name}'; choose one of {sorted(REMAT_POLICIES)} or 'none'")
  return REMAT_POLICIES[name]


def stack_layers(block_cls, depth: int, scan: bool, remat: str, static_argnums=()):
  """Returns a callable that builds `depth` blocks, scanned (one compiled body) or unrolled.

  Blocks have signature `block(x, *broadcast_args) -> (x, None)`. With `scan`, the params (and
  the decoding cache, if any) of all layers are stacked along a leading `layers` axis. `remat` is
  'none' or a policy name; `static_argnums` count `self` as 0.
  """
  if remat != "none":
    block_cls = nn.remat(block_cls, policy=remat_policy(remat), prevent_cse=not scan,
                         static_argnums=static_argnums)

  def build(parent_kwargs, name="layers", last_kwargs=None):
    """`last_kwargs`: extra fields of the last block (unrolled stacks only: a scan runs one body)."""
    if scan:
      if last_kwargs:
        raise ValueError("a scanned layer stack runs the same block at every depth; last_kwargs needs scan=False")
      return nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                     split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast, length=depth,
                     metadata_params={nn.PARTITION_NAME: "layers"})(name=name, **parent_kwargs)
    extra = lambda i: (last_kwargs or {}) if i == depth - 1 else {}
    blocks = [block_cls(name=f"{name}_{i}", **parent_kwargs, **extra(i)) for i in range(depth)]

    def run(x, *args):
      for b in blocks:
        x, _ = b(x, *args)
      return x, None
    return run
  return build


def gelu_exact(x):
  """x * Phi(x), written with erf as PyTorch's exact GELU is: XLA:CPU evaluates erf about twice as
  fast as the erfc that `nn.gelu(approximate=False)` uses (same values to 5e-7)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


# The Mlp's initialisers, shared by its nn.Dense layers and the fused path's _DenseParams.
_MLP_KERNEL_INIT = nn.initializers.xavier_uniform()
_MLP_BIAS_INIT = nn.initializers.normal(1e-6)


class Mlp(nn.Module):
  hidden: int
  dropout: float = 0.0
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32
  matmul: str = "auto"

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d = x.shape[-1]
    if self._fused(deterministic):
      w1, b1 = _DenseParams(self.hidden, ("embed", "mlp"), self.param_dtype, name="fc1")(d)
      w2, b2 = _DenseParams(d, ("mlp", "embed"), self.param_dtype, name="fc2")(self.hidden)
      return cpu_mlp.mlp(x.reshape(-1, d), w1, b1, w2, b2).reshape(x.shape)
    dg = dot_general(self.dtype_mm, self.matmul)
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1", dot_general=dg,
                 kernel_init=logical(_MLP_KERNEL_INIT, ("embed", "mlp")),
                 bias_init=logical(_MLP_BIAS_INIT, ("mlp",)))(x)
    h = nn.gelu(h, approximate=True) if self.gelu_approximate else gelu_exact(h)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    h = nn.Dropout(self.dropout)(h, deterministic)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2", dot_general=dg,
                    kernel_init=logical(_MLP_KERNEL_INIT, ("mlp", "embed")),
                    bias_init=logical(_MLP_BIAS_INIT, ("embed",)))(h)

  def _fused(self, deterministic) -> bool:
    """Whether the MLP runs as one `cpu_mlp.mlp` (the f32 matmul kernel with the exact GELU folded
    into its products): where `matmul` picks the kernel, outside a multi-device mesh, for f32
    compute and matmuls, the exact GELU and no dropout between the layers."""
    return (jnp.dtype(self.dtype) == jnp.float32 and jnp.dtype(self.dtype_mm) == jnp.float32
            and jnp.dtype(self.param_dtype) == jnp.float32 and not self.gelu_approximate
            and (self.dropout == 0 or deterministic) and not cpu_kernels.multi_device()
            and cpu_kernels_on(self.matmul, cpu_mlp.unavailable, "matmuls"))


class _DenseParams(nn.Module):
  """The parameters of one of the Mlp's `nn.Dense` layers (same names, shapes and initialisers),
  for the fused path that uses them without the Dense."""
  features: int
  axes: tuple
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features):
    w = self.param("kernel", logical(_MLP_KERNEL_INIT, self.axes), (in_features, self.features), self.param_dtype)
    b = self.param("bias", logical(_MLP_BIAS_INIT, self.axes[1:]), (self.features,), self.param_dtype)
    return w, b


class MultiHeadAttention(nn.Module):
  """Multi-head attention, self (context=None) or cross; `mask` is boolean [B, 1|H, Q, K].

  `causal=True` adds a lower-triangular mask (self-attention). `decode=True` uses the "cache"
  collection (apply with `mutable=["cache"]`): self-attention writes this call's keys/values into
  `cached_key`/`cached_value` ([B, cache_len, H, hd], created on the first call) at `cache_index`
  and attends causally over everything written so far, so a step may feed one token or a prefix;
  cross-attention projects `context` once into `cached_cross_key`/`cached_cross_value` and later
  calls read those (context may then be None). Parameters are the same in every mode.
  """
  num_heads: int
  qkv_bias: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32
  matmul: str = "auto"
  attention: str = "auto"

  def _proj(self, name, x, heads, head_dim):
    d = x.shape[-1]
    k = self.param(f"{name}_kernel", logical(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)),
                                              ("embed", "heads", "kv")), (d, heads, head_dim), self.param_dtype)
    y = jnp.einsum("btd,dhk->bthk", x.astype(self.dtype), k.astype(self.dtype),
                   _dot_general=dot_general(self.dtype_mm, self.matmul))
    if self.qkv_bias:
      b = self.param(f"{name}_bias", logical(nn.initializers.zeros, ("heads", "kv")), (heads, head_dim), self.param_dtype)
      y = y + b.astype(self.dtype)
    return constrain(y, ("act_batch", "act_length", "act_heads", "act_kv"))

  def _self_cache(self, k, v, cache_len):
    """Appends k, v [B, T, H, hd] to the cache; returns all cached k, v and the causal mask."""
    b, t, h, hd = k.shape
    length = cache_len or t
    ck = self.variable("cache", "cached_key", jnp.zeros, (b, length, h, hd), k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, (b, length, h, hd), v.dtype)
    ci = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    i = ci.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
    ci.value = i + t
    # Query j of this call sits at position i + j and may see every key at or before it.
    mask = jnp.arange(length)[None, :] <= (i + jnp.arange(t))[:, None]
    return ck.value, cv.value, mask[None, None]

  @nn.compact
  def __call__(self, x, context=None, mask=None, deterministic: bool = True, *, causal: bool = False,
               decode: bool = False, cache_len: Optional[int] = None):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    hd = d // self.num_heads
    dg = dot_general(self.dtype_mm, self.matmul)
    q = self._proj("query", x, self.num_heads, hd)
    cross = context is not None or (decode and self.has_variable("cache", "cached_cross_key"))
    if cross and decode and self.has_variable("cache", "cached_cross_key"):
      k = self.get_variable("cache", "cached_cross_key")
      v = self.get_variable("cache", "cached_cross_value")
    else:
      kv_in = context if cross else x
      k = self._proj("key", kv_in, self.num_heads, hd)
      v = self._proj("value", kv_in, self.num_heads, hd)
      if cross and decode:
        self.put_variable("cache", "cached_cross_key", k)
        self.put_variable("cache", "cached_cross_value", v)
    gpu_dtype = self._gpu_fused(mask, deterministic, decode, hd)
    if gpu_dtype is not None:
      out = _gpu_attention(q, k, v, 1.0 / float(hd) ** 0.5, causal and not cross, gpu_dtype,
                           strict=self.attention == "cudnn")
      if out is not None:
        return self._out(out.astype(self.dtype), d)
    precision = self._fused(mask, deterministic, decode)
    if precision:
      out = _sharded_kernel(q, k, v, 1.0 / float(hd) ** 0.5, causal and not cross, precision)
      if out is not None:
        return self._out(out, d)
    extra = None
    if decode and not cross:
      k, v, extra = self._self_cache(k, v, cache_len)
    elif causal:
      t = x.shape[1]
      extra = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if extra is not None:
      mask = extra if mask is None else jnp.logical_and(mask, extra)
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k, _dot_general=dg) / jnp.sqrt(hd).astype(self.dtype)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout)(weights, deterministic)
    out = jnp.einsum("bhqt,bthk->bqhk", weights, v, _dot_general=dg)
    return self._out(out, d)

  def _out(self, out, d):
    """The output projection of the heads' values [B, T, H, hd] -> [B, T, d]."""
    hd = out.shape[-1]
    wo = self.param("out_kernel", logical(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
                                          ("heads", "kv", "embed")), (self.num_heads, hd, d), self.param_dtype)
    bo = self.param("out_bias", logical(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
    y = jnp.einsum("bqhk,hkd->bqd", out, wo.astype(self.dtype), _dot_general=dot_general(self.dtype_mm, self.matmul))
    return constrain(y + bo.astype(self.dtype), BTD)

  def _kernel_call(self, mask, deterministic, decode) -> bool:
    """Whether this call is one the fused kernels (CPU and cuDNN) take: no mask but the causal one,
    not decoding, no dropout on the attention weights."""
    return mask is None and not decode and not (self.dropout > 0 and not deterministic)

  def _fused(self, mask, deterministic, decode) -> Optional[str]:
    """The matmul precision this call runs the fused CPU kernel with (see ATTENTION), or None for
    XLA's path; the kernel takes no mask but the causal one."""
    if self.attention not in ATTENTION:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION}")
    if self.attention in ("xla", "cudnn") or not self._kernel_call(mask, deterministic, decode):
      return None
    # The bf16 build takes f32 or bf16 activations; the f32 one only f32 (plain f32 dots on bf16
    # activations round differently).
    precision = "bfloat16" if jnp.dtype(self.dtype_mm) == jnp.bfloat16 else "float32"
    takes = (jnp.float32, jnp.bfloat16) if precision == "bfloat16" else (jnp.float32,)
    if jnp.dtype(self.dtype) not in takes:
      return None
    reason = cpu_attention.unavailable(precision)
    if self.attention == "auto":
      return None if reason else precision
    if reason:
      raise ValueError(f"{reason} (model.attention='cpu_fused'; set it to 'auto' or 'xla')")
    return precision

  def _gpu_fused(self, mask, deterministic, decode, head_dim) -> Optional[Any]:
    """The dtype q, k, v go to cuDNN's flash attention in, or None for the other paths. It takes
    bf16/f16 only: bf16 compute, or f32 compute with bf16 matmuls (`dtype_mm`, whose semantics
    cuDNN keeps: bf16 products, f32 accumulation and softmax)."""
    if self.attention not in ("auto", "cudnn") or not self._kernel_call(mask, deterministic, decode):
      return None
    strict = self.attention == "cudnn"
    if _backend() != "gpu":
      if strict:
        raise ValueError(f"model.attention='cudnn' needs a CUDA GPU, and this process runs on "
                         f"{_backend()}; set model.attention to 'auto' or 'xla'")
      return None
    if jnp.dtype(self.dtype) in (jnp.bfloat16, jnp.float16):
      dtype = jnp.dtype(self.dtype)
    elif jnp.dtype(self.dtype_mm) == jnp.bfloat16:
      dtype = jnp.dtype(jnp.bfloat16)
    else:
      if strict:
        raise ValueError(f"model.attention='cudnn' computes in bf16 or f16, and this model computes "
                         f"attention in {jnp.dtype(self.dtype).name}; set model.dtype or model.dtype_mm "
                         f"to 'bfloat16', or model.attention to 'auto' or 'xla'")
      return None
    if head_dim % 8 or head_dim > 128:
      if strict:
        raise ValueError(f"model.attention='cudnn' needs a head dimension that is a multiple of 8 and "
                         f"at most 128, not {head_dim} (width / num_heads); change num_heads or set "
                         f"model.attention to 'auto' or 'xla'")
      return None
    return dtype


def _gpu_attention(q, k, v, scale, causal, dtype, strict):
  """softmax(q k^T * scale) v for q, k, v [B, T, H, hd] through `jax.nn.dot_product_attention`
  (cuDNN), or None where JAX says cuDNN cannot run it (unless `strict`)."""
  try:
    return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), scale=scale,
                                        is_causal=causal, implementation=_GPU_IMPL)
  except (NotImplementedError, RuntimeError) as e:  # no cuDNN, too old a cuDNN, unsupported shape
    if strict:
      raise ValueError(f"model.attention='cudnn' cannot run here: {e}; set model.attention to 'auto' "
                       f"or 'xla'") from e
    return None


def _sharded_kernel(q, k, v, scale, causal, precision):
  """cpu_attention.attention under the current mesh: per shard of the batch and head axes, or
  None when the arrays do not divide evenly over them (the caller then uses XLA)."""
  fn = lambda q, k, v: cpu_attention.attention(q, k, v, scale, causal, precision)
  if not cpu_kernels.multi_device():
    return fn(q, k, v)
  mesh = jax.sharding.get_abstract_mesh()
  names = nn.logical_to_mesh_axes(("act_batch", "act_length", "act_heads", "act_kv"))
  if names is None or names[1] is not None or names[3] is not None:
    return None
  for axis in (0, 2):  # batch and heads
    entry = names[axis] or ()
    size = math.prod(mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,)))
    if q.shape[axis] % size or k.shape[axis] % size:
      return None
  spec = jax.sharding.PartitionSpec(*names)
  # check_vma=False: the FFI call carries no varying-manual-axes types for shard_map to check.
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


class LayerNorm(nn.LayerNorm):
  """`nn.LayerNorm` (same parameters and math), run by the CPU LayerNorm kernel (`models.cpu_norm`)
  when `kernel` is set and the input, compute and parameter dtypes are float32."""
  kernel: bool = False

  @nn.compact
  def __call__(self, x, *, mask=None):
    plain = (self.use_scale and self.use_bias and self.reduction_axes == -1 and self.feature_axes == -1
             and mask is None)
    dtype = self.dtype or jnp.promote_types(x.dtype, self.param_dtype)  # as nn.LayerNorm infers it
    if not (self.kernel and plain and x.dtype == dtype == self.param_dtype == jnp.float32
            and not cpu_kernels.multi_device()):
      return super().__call__(x, mask=mask)
    d = x.shape[-1]
    scale = self.param("scale", self.scale_init, (d,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (d,), self.param_dtype)
    return cpu_norm.layer_norm(x, scale, bias, self.epsilon)


def layer_norm(eps, dtype, param_dtype, name, matmul: str = "auto"):
  """A LayerNorm over the embedding axis; `matmul` (models.precision.MATMUL) also picks the kernel."""
  return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel=cpu_kernels_on(matmul, cpu_norm.unavailable, "LayerNorms"),
                   scale_init=logical(nn.initializers.ones, ("embed",)),
                   bias_init=logical(nn.initializers.zeros, ("embed",)))


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + Mlp(LN(x)); `mask` [B, 1|H, T, T] optional.

  Shared by the ViT encoder and the text encoder (same parameter names: ln1, attn, ln2, mlp).
  `post_ln=True` is the BERT order instead: LN(x + Attn(x)), then LN(x + Mlp(x)), with ln1/ln2
  normalising after the attention / MLP residual.
  `queries=n` (pre-LN only) returns the first n tokens' outputs alone: only they query the
  attention (their keys and values still come from every token) and go through the MLP, so a
  last block whose other outputs nobody reads (a class-token-pooled ViT) skips that work.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  post_ln: bool = False
  deterministic: bool = True
  queries: int = 0  # 0: every token's output
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32
  matmul: str = "auto"
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dtype_mm=self.dtype_mm, matmul=self.matmul)
    drop = lambda y: nn.Dropout(self.dropout)(y, self.deterministic)
    x = constrain(x, BTD)
    ln1 = layer_norm(self.ln_eps, name="ln1", matmul=self.matmul, **kw)
    ln2 = layer_norm(self.ln_eps, name="ln2", matmul=self.matmul, **kw)
    attn = MultiHeadAttention(self.num_heads, name="attn", attention=self.attention, **mm)
    mlp = Mlp(self.mlp_dim, dropout=self.dropout, gelu_approximate=self.gelu_approximate, name="mlp", **mm)
    if self.post_ln:
      if self.queries:
        raise ValueError("EncoderBlock(queries=...) is for pre-LN blocks; post_ln=True runs every token")
      x = ln1(x + drop(attn(x, mask=mask, deterministic=self.deterministic)))
      x = ln2(x + drop(mlp(x, self.deterministic)))
      return constrain(x, BTD), None
    if self.queries:
      y, n = ln1(x), self.queries
      mask = None if mask is None else mask[:, :, :n]
      x = x[:, :n] + drop(attn(y[:, :n], context=y, mask=mask, deterministic=self.deterministic))
    else:
      x = x + drop(attn(ln1(x), mask=mask, deterministic=self.deterministic))
    x = x + drop(mlp(ln2(x), self.deterministic))
    return constrain(x, BTD), None
