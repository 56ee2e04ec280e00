"""Text towers: Decoder shapes, causal masking, tied/untied heads, scan == unrolled, KV-cache
decoding == full forward, logical names; TextEncoder pooling with padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models.text import Decoder, TextEncoder

KW = dict(vocab_size=23, width=32, depth=2, num_heads=4, mlp_dim=48, max_len=12)
B, T, N = 2, 7, 5


def _inputs(enc_width=32):
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, KW["vocab_size"])
  encoded = jax.random.normal(jax.random.PRNGKey(1), (B, N, enc_width))
  return tokens, encoded


def _init(model, tokens, encoded):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(2), tokens, encoded))


def _unstack(params, depth):
  p = dict(params)
  layers = p.pop("layers")
  for i in range(depth):
    p[f"layers_{i}"] = jax.tree.map(lambda a: a[i], layers)
  return p


def test_shapes_and_enc_proj():
  tokens, encoded = _inputs(enc_width=24)
  m = Decoder(**KW)
  v = _init(m, tokens, encoded)
  logits = m.apply(v, tokens, encoded)
  assert logits.shape == (B, T, KW["vocab_size"]) and logits.dtype == jnp.float32
  assert v["params"]["enc_proj"]["kernel"].shape == (24, 32)
  assert v["params"]["token_embed"]["embedding"].shape == (23, 32)
  assert v["params"]["pos_embedding"].shape == (12, 32)
  assert "enc_proj" not in _init(m, *_inputs(enc_width=32))["params"]
  with pytest.raises(ValueError, match="max_len"):
    m.apply(v, jnp.zeros((B, 13), jnp.int32), encoded)


def test_causal_masking_and_parallel_mode():
  tokens, encoded = _inputs()
  m = Decoder(**KW)
  v = _init(m, tokens, encoded)
  changed = tokens.at[:, 4:].set((tokens[:, 4:] + 1) % KW["vocab_size"])
  a, b = m.apply(v, tokens, encoded), m.apply(v, changed, encoded)
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
  assert float(jnp.abs(a[:, 4:] - b[:, 4:]).max()) > 1e-4
  pa, pb = m.apply(v, tokens, encoded, causal=False), m.apply(v, changed, encoded, causal=False)
  assert float(jnp.abs(pa[:, :4] - pb[:, :4]).max()) > 1e-4  # parallel prediction sees later tokens
  assert float(jnp.abs(pa - a).max()) > 1e-4
  with pytest.raises(ValueError, match="causal"):
    m.apply(v, tokens, encoded, causal=False, decode=True, mutable=["cache"])


def test_tied_vs_untied():
  tokens, encoded = _inputs()
  tied, untied = Decoder(**KW), Decoder(**KW, tie_embeddings=False)
  pt, pu = _init(tied, tokens, encoded)["params"], _init(untied, tokens, encoded)["params"]
  assert "head" not in pt
  assert set(pu) == set(pt) | {"head"}
  assert set(pu["head"]) == {"kernel"} and pu["head"]["kernel"].shape == (32, 23)
  # An untied head equal to the transposed embedding computes the tied model.
  pu = {**pt, "head": {"kernel": pt["token_embed"]["embedding"].T}}
  np.testing.assert_allclose(tied.apply({"params": pt}, tokens, encoded),
                             untied.apply({"params": pu}, tokens, encoded), atol=1e-5)


def test_scan_matches_unrolled_and_remat():
  tokens, encoded = _inputs(enc_width=24)
  scanned = Decoder(**KW)
  v = _init(scanned, tokens, encoded)
  a = scanned.apply(v, tokens, encoded)
  b = Decoder(**KW, scan_layers=False).apply({"params": _unstack(v["params"], KW["depth"])}, tokens, encoded)
  np.testing.assert_allclose(a, b, atol=1e-5)
  c = Decoder(**KW, remat="nothing_saveable").apply(v, tokens, encoded)
  np.testing.assert_allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_matches_full_forward(scan):
  tokens, encoded = _inputs(enc_width=24)
  m = Decoder(**KW, scan_layers=scan)
  v = _init(m, tokens, encoded)
  full = m.apply(v, tokens, encoded)
  # Prefill three tokens, then one token per step; encoded is only needed on the first call.
  out, cache = m.apply(v, tokens[:, :3], encoded, decode=True, mutable=["cache"])
  outs = [out]
  for i in range(3, T):
    out, cache = m.apply({**v, **cache}, tokens[:, i:i + 1], None, decode=True, mutable=["cache"])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  assert int(cache["cache"]["position"]) == T
  names = {"/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(cache)}
  assert any(n.endswith("self_attn/cached_key") for n in names)
  assert any(n.endswith("cross_attn/cached_cross_key") for n in names)
  with pytest.raises(ValueError, match="needs encoded"):
    m.apply(v, tokens[:, :1], None, decode=True, mutable=["cache"])


def test_every_parameter_has_logical_names():
  tokens, encoded = _inputs(enc_width=24)
  for model, args in ((Decoder(**KW, tie_embeddings=False), (tokens, encoded)),
                      (TextEncoder(**KW), (tokens,))):
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)


def _text_encoder(pool, causal=False):
  return TextEncoder(**KW, pool=pool, causal=causal)


@pytest.mark.parametrize("pool", ["last", "first", "mean"])
def test_text_encoder_pooling_ignores_padding(pool):
  short = jnp.array([[5, 6, 7, 8], [9, 10, 11, 0]])
  padded = jnp.concatenate([short, jnp.zeros((2, 3), jnp.int32)], axis=1)
  m = _text_encoder(pool)
  v = nn.meta.unbox(m.init(jax.random.PRNGKey(0), padded))
  ps, xs = m.apply(v, short)
  pp, xp = m.apply(v, padded)
  assert pp.shape == (2, 32) and xp.shape == (2, 7, 32)
  np.testing.assert_allclose(ps, pp, atol=1e-5)
  np.testing.assert_allclose(xs[0], xp[0, :4], atol=1e-5)
  np.testing.assert_allclose(xs[1, :3], xp[1, :3], atol=1e-5)
  expect = {"last": jnp.stack([xp[0, 3], xp[1, 2]]), "first": xp[:, 0],
            "mean": jnp.stack([xp[0, :4].mean(0), xp[1, :3].mean(0)])}[pool]
  np.testing.assert_allclose(pp, expect, atol=1e-5)


def test_text_encoder_causal_vs_bidirectional():
  tokens = jnp.array([[5, 6, 7, 8, 0]])
  changed = tokens.at[0, 3].set(12)
  causal, bidi = _text_encoder("last", causal=True), _text_encoder("last")
  v = nn.meta.unbox(causal.init(jax.random.PRNGKey(0), tokens))
  _, a = causal.apply(v, tokens)
  _, b = causal.apply(v, changed)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  _, c = bidi.apply(v, tokens)
  _, d = bidi.apply(v, changed)
  assert float(jnp.abs(c[:, :3] - d[:, :3]).max()) > 1e-4
  with pytest.raises(ValueError, match="pool"):
    _text_encoder("max").init(jax.random.PRNGKey(0), tokens)


def test_text_encoder_last_position_and_bert_layout():
  tokens = jnp.array([[5, 6, 7, 0, 0], [9, 10, 11, 12, 13]])
  m = _text_encoder("last_position")
  v = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), tokens))
  pooled, x = jax.jit(m.apply)(v, tokens)
  np.testing.assert_allclose(pooled, x[:, -1], atol=0)  # SigLIP: the last position, pad or not
  bert = TextEncoder(**KW, layout="bert", pool="first")
  params = nn.meta.unbox(jax.jit(bert.init)(jax.random.PRNGKey(0), tokens))["params"]
  # BERT extras sit beside the default names; no final LayerNorm (post-LN blocks end normalised).
  assert {"embed_norm", "type_embedding"} <= set(params) and "norm" not in params
  assert params["type_embedding"].shape == (2, 32) and set(params) - {"embed_norm", "type_embedding"} <= set(v["params"])
  pooled, x = jax.jit(bert.apply)({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(x).mean(-1), 0.0, atol=1e-5)  # every position leaves a LayerNorm
