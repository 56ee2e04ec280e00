"""Mapping between `vlm_jax.models.text.Decoder` params and Hugging Face GPT-2 weights.

The target is `GPT2LMHeadModel(GPT2Config(add_cross_attention=True, ...))`, as used as the decoder
of a `VisionEncoderDecoderModel`. Keys are those of `GPT2LMHeadModel.state_dict()`
(`transformer.h.{i}.attn.c_attn.weight`, ..., `lm_head.weight`); `enc_proj`, when the decoder has
one, maps to `enc_to_dec_proj.{weight,bias}`, which lives at the top level of the
VisionEncoderDecoderModel (the exporter prefixes the GPT-2 keys with `decoder.`).

Layouts: GPT-2's Conv1D weights are [in, out] like a flax kernel (no transpose); attention
projections are fused (self: q|k|v [D, 3D], cross: q [D, D] and k|v [D, 2D]) and head-major, so
our [D, H, hd] kernels are reshapes; `lm_head` / `enc_to_dec_proj` are Linear ([out, in]).
Config values that must match (the exporter writes them): n_embd=width, n_layer=depth,
n_head=num_heads, n_inner=mlp_dim, n_positions=max_len, vocab_size, layer_norm_epsilon=ln_eps,
activation_function="gelu_new" (gelu_approximate=True) or "gelu", tie_word_embeddings.
"""

from typing import Mapping, Optional

import numpy as np

from vlm_jax.hf.tree import f32, ln_from, split_heads, stacked, unstacked_blocks

_LN = (("ln_1", "ln1"), ("ln_cross_attn", "ln_cross"), ("ln_2", "ln2"))


def _attn_from(q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, num_heads):
  out = {}
  for name, w, b in (("query", q_w, q_b), ("key", k_w, k_b), ("value", v_w, v_b)):
    out[f"{name}_kernel"], out[f"{name}_bias"] = split_heads(w, b, num_heads)
  out["out_kernel"] = o_w.reshape(num_heads, -1, o_w.shape[1])
  out["out_bias"] = o_b
  return out


def _block_from(sd, p, num_heads):
  g = lambda k: f32(sd[f"{p}.{k}"])
  d = g("attn.c_attn.weight").shape[0]
  qkv_w, qkv_b = g("attn.c_attn.weight"), g("attn.c_attn.bias")
  kv_w, kv_b = g("crossattention.c_attn.weight"), g("crossattention.c_attn.bias")
  block = {ours: ln_from(sd, f"{p}.{theirs}") for theirs, ours in _LN}
  block["self_attn"] = _attn_from(qkv_w[:, :d], qkv_b[:d], qkv_w[:, d:2 * d], qkv_b[d:2 * d],
                                  qkv_w[:, 2 * d:], qkv_b[2 * d:], g("attn.c_proj.weight"),
                                  g("attn.c_proj.bias"), num_heads)
  block["cross_attn"] = _attn_from(g("crossattention.q_attn.weight"), g("crossattention.q_attn.bias"),
                                   kv_w[:, :d], kv_b[:d], kv_w[:, d:], kv_b[d:],
                                   g("crossattention.c_proj.weight"), g("crossattention.c_proj.bias"), num_heads)
  block["mlp"] = {"fc1": {"kernel": g("mlp.c_fc.weight"), "bias": g("mlp.c_fc.bias")},
                  "fc2": {"kernel": g("mlp.c_proj.weight"), "bias": g("mlp.c_proj.bias")}}
  return block


def decoder_from_gpt2_state_dict(state_dict: Mapping, depth: int, num_heads: int, *, scan_layers: bool = True,
                                 tie_embeddings: Optional[bool] = None) -> dict:
  """GPT-2 (LM head, cross-attention) weights -> `Decoder` params (numpy, the `params` collection).

  `state_dict` holds torch tensors or arrays under `GPT2LMHeadModel` names, optionally with a
  `decoder.` prefix (a VisionEncoderDecoderModel's state dict) and `enc_to_dec_proj.*`.
  `tie_embeddings=None` ties when `lm_head.weight` is absent or equal to the token embedding; the
  Decoder must be built with the same `tie_embeddings`, `scan_layers` and `num_heads`.
  """
  sd = {}
  for k, v in state_dict.items():
    sd[k[len("decoder."):] if k.startswith("decoder.") else k] = v
  if "transformer.wte.weight" not in sd:
    raise ValueError("not a GPT2LMHeadModel state dict: 'transformer.wte.weight' is missing")
  if f"transformer.h.{depth - 1}.crossattention.c_attn.weight" not in sd:
    raise ValueError(f"state dict has no cross-attention layer {depth - 1}: wrong depth, or a GPT-2 built "
                     "without add_cross_attention=True")
  if f"transformer.h.{depth}.ln_1.weight" in sd:
    raise ValueError(f"state dict has more than depth={depth} layers")
  wte = f32(sd["transformer.wte.weight"])
  params = {"token_embed": {"embedding": wte}, "pos_embedding": f32(sd["transformer.wpe.weight"]),
            "norm": ln_from(sd, "transformer.ln_f")}
  blocks = [_block_from(sd, f"transformer.h.{i}", num_heads) for i in range(depth)]
  params.update(stacked(blocks, scan_layers))
  head = f32(sd["lm_head.weight"]) if "lm_head.weight" in sd else None
  if tie_embeddings is None:
    tie_embeddings = head is None or np.array_equal(head, wte)
  if not tie_embeddings:
    if head is None:
      raise ValueError("tie_embeddings=False but the state dict has no 'lm_head.weight'")
    params["head"] = {"kernel": head.T.copy()}
  if "enc_to_dec_proj.weight" in sd:
    params["enc_proj"] = {"kernel": f32(sd["enc_to_dec_proj.weight"]).T.copy(),
                          "bias": f32(sd["enc_to_dec_proj.bias"])}
  return params


def _attn_to(a):
  q, k, v, o = (np.asarray(a[f"{n}_kernel"], np.float32) for n in ("query", "key", "value", "out"))
  d = q.shape[0]
  flat = lambda w: w.reshape(d, -1)
  bias = lambda n: np.asarray(a[f"{n}_bias"], np.float32).reshape(-1)
  return flat(q), bias("query"), flat(k), bias("key"), flat(v), bias("value"), o.reshape(-1, o.shape[-1]), \
      np.asarray(a["out_bias"], np.float32)


def decoder_to_gpt2_state_dict(params: Mapping) -> dict:
  """`Decoder` params (scanned or unrolled) -> {GPT2LMHeadModel key: float32 numpy array}.

  Includes `lm_head.weight` (a copy of the token embedding when tied) and, when the decoder has
  `enc_proj`, `enc_to_dec_proj.weight`/`.bias` (VisionEncoderDecoderModel top-level keys).
  """
  params = params.get("params", params)
  f = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  wte = f(params["token_embed"]["embedding"])
  sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": f(params["pos_embedding"])}
  for i, blk in enumerate(unstacked_blocks(params)):
    p = f"transformer.h.{i}"
    for theirs, ours in _LN:
      sd[f"{p}.{theirs}.weight"], sd[f"{p}.{theirs}.bias"] = f(blk[ours]["scale"]), f(blk[ours]["bias"])
    qw, qb, kw, kb, vw, vb, ow, ob = _attn_to(blk["self_attn"])
    sd[f"{p}.attn.c_attn.weight"] = f(np.concatenate([qw, kw, vw], axis=1))
    sd[f"{p}.attn.c_attn.bias"] = f(np.concatenate([qb, kb, vb]))
    sd[f"{p}.attn.c_proj.weight"], sd[f"{p}.attn.c_proj.bias"] = f(ow), f(ob)
    qw, qb, kw, kb, vw, vb, ow, ob = _attn_to(blk["cross_attn"])
    sd[f"{p}.crossattention.q_attn.weight"], sd[f"{p}.crossattention.q_attn.bias"] = f(qw), f(qb)
    sd[f"{p}.crossattention.c_attn.weight"] = f(np.concatenate([kw, vw], axis=1))
    sd[f"{p}.crossattention.c_attn.bias"] = f(np.concatenate([kb, vb]))
    sd[f"{p}.crossattention.c_proj.weight"], sd[f"{p}.crossattention.c_proj.bias"] = f(ow), f(ob)
    for theirs, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
      sd[f"{p}.mlp.{theirs}.weight"] = f(blk["mlp"][ours]["kernel"])
      sd[f"{p}.mlp.{theirs}.bias"] = f(blk["mlp"][ours]["bias"])
  sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = f(params["norm"]["scale"]), f(params["norm"]["bias"])
  sd["lm_head.weight"] = f(np.asarray(params["head"]["kernel"]).T) if "head" in params else wte.copy()
  if "enc_proj" in params:
    sd["enc_to_dec_proj.weight"] = f(np.asarray(params["enc_proj"]["kernel"]).T)
    sd["enc_to_dec_proj.bias"] = f(params["enc_proj"]["bias"])
  return sd
