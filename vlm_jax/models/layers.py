"""Shared building blocks: Mlp, MultiHeadAttention, remat policies, logical-axis helpers.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) and large
activations are constrained with `act_*` names; `vlm_jax.parallel.RULES` maps them to the mesh.
Every matmul goes through `precision.dot_general(dtype_mm)` (bf16 operands with f32 accumulation
when `dtype_mm="bfloat16"`). Attention weights are stored head-major as [embed, heads, head_dim]
(q/k/v) and [heads, head_dim, embed] (output), which maps one-to-one onto Hugging Face's Linear
layers.
MultiHeadAttention also owns the decoding KV cache (flax "cache" collection): self-attention
appends keys/values at `cache_index`; cross-attention projects the context once and reuses it.
softmax(q k^T) v runs as XLA einsums (`xla_attention`) unless the module is handed an
`attention_fn` (`vlm_jax.kernels` picks one, e.g. cuDNN's flash attention on a GPU): that function
takes the unmasked or causal calls outside decoding without attention dropout; masks, the KV
cache and dropout stay on the einsum path.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vlm_jax.models.precision import dot_general

Dtype = Any
# attention_fn(q, k, v, *, scale, causal) -> [B, Q, H, hd] for q [B, Q, H, hd], k, v [B, K, H, hd].
AttentionFn = Optional[Callable]

BTD = ("act_batch", "act_length", "act_embed")


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



def xla_attention(q, k, v, *, scale, causal=False, mask=None, dot_general=lax.dot_general, dropout=None):
  """softmax(q k^T * scale) v as XLA einsums, for q [B, Q, H, hd] and k, v [B, K, H, hd]; `mask`
  boolean [B, 1|H, Q, K] (True: attend), `causal` adds the lower triangle; `dropout` (optional)
  is applied to the attention weights. Softmax in float32, weights back in q's dtype."""
  if causal:
    tril = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    mask = tril if mask is None else jnp.logical_and(mask, tril)
  logits = jnp.einsum("bqhk,bthk->bhqt", q, k, _dot_general=dot_general) * jnp.asarray(scale, q.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum("bhqt,bthk->bqhk", weights, v, _dot_general=dot_general)


class Mlp(nn.Module):
  hidden: int
  dropout: float = 0.0
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d = x.shape[-1]
    dg = dot_general(self.dtype_mm)
    init = nn.initializers.xavier_uniform()
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1", dot_general=dg,
                 kernel_init=logical(init, ("embed", "mlp")),
                 bias_init=logical(nn.initializers.normal(1e-6), ("mlp",)))(x)
    h = nn.gelu(h, approximate=self.gelu_approximate)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    h = nn.Dropout(self.dropout)(h, deterministic)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2", dot_general=dg,
                    kernel_init=logical(init, ("mlp", "embed")),
                    bias_init=logical(nn.initializers.normal(1e-6), ("embed",)))(h)


class MultiHeadAttention(nn.Module):
  """Multi-head attention, self (context=None) or cross; `mask` is boolean [B, 1|H, Q, K].

  `causal=True` adds a lower-triangular mask (self-attention). `decode=True` uses the "cache"
  collection (apply with `mutable=["cache"]`): self-attention writes this call's keys/values into
  `cached_key`/`cached_value` ([B, cache_len, H, hd], created on the first call) at `cache_index`
  and attends causally over everything written so far, so a step may feed one token or a prefix;
  cross-attention projects `context` once into `cached_cross_key`/`cached_cross_value` and later
  calls read those (context may then be None). Parameters are the same in every mode.
  `attention_fn` (see `AttentionFn`; None: `xla_attention`) runs the calls without a mask other
  than the causal one, outside decoding, without dropout on the attention weights.
  """
  num_heads: int
  qkv_bias: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dtype_mm: Dtype = jnp.float32
  attention_fn: AttentionFn = None

  def _proj(self, name, x, heads, head_dim):
    d = x.shape[-1]
    k = self.param(f"{name}_kernel", logical(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)),
                                              ("embed", "heads", "kv")), (d, heads, head_dim), self.param_dtype)
    y = jnp.einsum("btd,dhk->bthk", x.astype(self.dtype), k.astype(self.dtype),
                   _dot_general=dot_general(self.dtype_mm))
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
    ck.value = lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
    cv.value = lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
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
    scale = 1.0 / float(hd) ** 0.5
    causal = causal and not cross
    dropout = self.dropout > 0 and not deterministic
    if self.attention_fn is not None and mask is None and not decode and not dropout:
      return self._out(self.attention_fn(q, k, v, scale=scale, causal=causal).astype(self.dtype), d)
    if decode and not cross:
      k, v, cached = self._self_cache(k, v, cache_len)
      mask, causal = (cached if mask is None else jnp.logical_and(mask, cached)), False
    out = xla_attention(q, k, v, scale=scale, causal=causal, mask=mask, dot_general=dot_general(self.dtype_mm),
                        dropout=lambda w: nn.Dropout(self.dropout)(w, deterministic))
    return self._out(out, d)

  def _out(self, out, d):
    """The output projection of the heads' values [B, T, H, hd] -> [B, T, d]."""
    hd = out.shape[-1]
    wo = self.param("out_kernel", logical(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
                                          ("heads", "kv", "embed")), (self.num_heads, hd, d), self.param_dtype)
    bo = self.param("out_bias", logical(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
    y = jnp.einsum("bqhk,hkd->bqd", out, wo.astype(self.dtype), _dot_general=dot_general(self.dtype_mm))
    return constrain(y + bo.astype(self.dtype), BTD)


def layer_norm(eps, dtype, param_dtype, name):
  """A LayerNorm over the embedding axis."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
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
  attention_fn: AttentionFn = None

  @nn.compact
  def __call__(self, x, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mm = dict(kw, dtype_mm=self.dtype_mm)
    drop = lambda y: nn.Dropout(self.dropout)(y, self.deterministic)
    x = constrain(x, BTD)
    ln1 = layer_norm(self.ln_eps, name="ln1", **kw)
    ln2 = layer_norm(self.ln_eps, name="ln2", **kw)
    attn = MultiHeadAttention(self.num_heads, name="attn", attention_fn=self.attention_fn, **mm)
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
