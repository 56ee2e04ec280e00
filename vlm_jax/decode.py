"""Batched, jit-compiled autoregressive decoding with a KV cache: greedy, beam search, sampling.

Works with any linen module that has `encode(images) -> encoded` and
`decode(tokens, encoded, *, decode=bool) -> logits` (`vlm_jax.models.vlm.Captioner`).

Sequences: every example starts from its prompt, [B, P] right-padded with `pad_id` (default: one
BOS per example; for VQA `[BOS] question [SEP]`). Step t feeds the token at position t through the
cache (one token per step, the same position for the whole batch) and chooses position t + 1;
while t + 1 is still inside an example's prompt, the prompt token is forced instead, so prompts
of different lengths need no special prefill. Results are the generated tokens only, left-aligned
[B, max_len]: an example stops at EOS (kept) or after `max_len` tokens, and everything after its
EOS is `pad_id`. The loop ends early once every example has stopped (`jax.lax.while_loop`).
The prompt plus `max_len` must fit the decoder's position embedding.

`greedy_uncached` recomputes the full forward pass every step; it is the reference the cached
loops are tested against (and a baseline for the benchmark).
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

NEG = -1e9  # score of an impossible beam; finite so that sums stay finite
_COMPILED: dict = {}


def _jitted(kind, impl, model, **static):
  """One compiled function per (decoder kind, model config, static options)."""
  key = (kind, type(model).__name__, repr(model), tuple(sorted(static.items())))
  if key not in _COMPILED:
    if len(_COMPILED) > 64:
      _COMPILED.clear()
    _COMPILED[key] = jax.jit(lambda params, images, prompt, rng: impl(model, params, images, prompt, rng, **static))
  return _COMPILED[key]


def _check_len(model, prompt, max_len):
  p = 1 if prompt is None else prompt.shape[1]
  limit = getattr(model, "text_max_len", None)
  if max_len < 1:
    raise ValueError(f"max_len must be at least 1, got {max_len}")
  if limit is not None and p + max_len > limit:
    raise ValueError(f"prompt length {p} + max_len {max_len} exceeds the decoder's max_len {limit}; "
                     "shorten the prompt or max_len, or train a decoder with a longer max_len")


def _start(prompt, batch, max_len, bos_id, pad_id):
  """-> seq [B, P + max_len] (prompt, then PAD) and prompt lengths [B]."""
  if prompt is None:
    prompt = jnp.full((batch, 1), bos_id, jnp.int32)
  prompt = jnp.asarray(prompt, jnp.int32)
  plen = jnp.maximum(jnp.sum(prompt != pad_id, axis=1), 1)
  prompt = jnp.where(jnp.arange(prompt.shape[1])[None] < plen[:, None], prompt, pad_id)
  return jnp.concatenate([prompt, jnp.full((batch, max_len), pad_id, jnp.int32)], axis=1), plen


def _generated(seq, plen, max_len):
  return jnp.take_along_axis(seq, plen[:, None] + jnp.arange(max_len)[None], axis=1)


def _fns(model, params):
  variables = {"params": params}

  def step(tokens, encoded, cache):
    v = variables if cache is None else {**variables, "cache": cache}
    logits, mut = model.apply(v, tokens, encoded, decode=True, method="decode", mutable=["cache"])
    return logits[:, -1].astype(jnp.float32), mut["cache"]

  encode = lambda images: model.apply(variables, images, method="encode")
  full = lambda seq, encoded: model.apply(variables, seq, encoded, method="decode")
  return encode, step, full


def _advance(seq, done, t, nxt, plen, max_len, eos_id, pad_id):
  """Writes position t + 1: the prompt token, the chosen `nxt`, or PAD once an example stopped."""
  pos = t + 1
  forced = pos < plen
  tok = jnp.where(forced, jax.lax.dynamic_index_in_dim(seq, pos, axis=1, keepdims=False), nxt)
  tok = jnp.where(done, pad_id, tok).astype(seq.dtype)
  seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], pos, axis=1)
  done = done | (~forced & ((tok == eos_id) | (pos - plen >= max_len - 1)))
  return seq, done


def _filter(logits, temperature, top_k, top_p):
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the most likely token is always kept
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _constrain(logits, generated_pos, allowed):
  """Logits with every token outside `allowed[k]` (a [start, stop) id range) at -inf in the rows
  whose next token is generated token k; rows past the ranges are left alone."""
  lo = jnp.array([a for a, _ in allowed], jnp.int32)
  hi = jnp.array([b for _, b in allowed], jnp.int32)
  k = jnp.clip(generated_pos, 0, len(allowed) - 1)
  ids = jnp.arange(logits.shape[-1])[None]
  ok = (ids >= lo[k][:, None]) & (ids < hi[k][:, None])
  ok |= ((generated_pos < 0) | (generated_pos >= len(allowed)))[:, None]
  return jnp.where(ok, logits, -jnp.inf)


def _loop_impl(model, params, images, prompt, rng, *, max_len, bos_id, eos_id, pad_id, cached,
               temperature=0.0, top_k=0, top_p=1.0, allowed=None):
  encode, step, full = _fns(model, params)
  encoded = encode(images)
  seq, plen = _start(prompt, encoded.shape[0], max_len, bos_id, pad_id)
  length = seq.shape[1]

  def choose(logits, t):
    if allowed:
      logits = _constrain(logits, t + 1 - plen, allowed)
    if temperature == 0:
      return jnp.argmax(logits, axis=-1)
    key = jax.random.fold_in(rng, t)
    return jax.random.categorical(key, _filter(logits, temperature, top_k, top_p), axis=-1)

  def logits_at(t, seq, cache):
    if cached:
      return step(jax.lax.dynamic_slice_in_dim(seq, t, 1, axis=1), None, cache)
    return jax.lax.dynamic_index_in_dim(full(seq, encoded), t, axis=1, keepdims=False), cache

  if cached:
    logits, cache = step(seq[:, :1], encoded, None)
  else:
    logits, cache = full(seq, encoded)[:, 0], ()
  seq, done = _advance(seq, jnp.zeros(seq.shape[0], bool), 0, choose(logits, 0), plen, max_len, eos_id, pad_id)

  def body(carry):
    t, seq, done, cache = carry
    logits, cache = logits_at(t, seq, cache)
    seq, done = _advance(seq, done, t, choose(logits, t), plen, max_len, eos_id, pad_id)
    return t + 1, seq, done, cache

  cond = lambda c: (c[0] < length - 1) & ~jnp.all(c[2])
  _, seq, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), seq, done, cache))
  return _generated(seq, plen, max_len)


def greedy(model, params, images, prompt=None, *, max_len: int, bos_id: int = 1, eos_id: int = 2,
           pad_id: int = 0, allowed: tuple = None):
  """Greedy decoding with the KV cache -> tokens [B, max_len]. `allowed`: for the first generated
  tokens, one [start, stop) range of token ids each (the rest get -inf logits), e.g. a box syntax."""
  _check_len(model, prompt, max_len)
  fn = _jitted("greedy", _loop_impl, model, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
               cached=True, allowed=allowed)
  return fn(params, images, prompt, None)


def greedy_uncached(model, params, images, prompt=None, *, max_len: int, bos_id: int = 1, eos_id: int = 2,
                    pad_id: int = 0):
  """Greedy decoding that reruns the whole decoder on the full sequence every step (reference)."""
  _check_len(model, prompt, max_len)
  fn = _jitted("greedy_uncached", _loop_impl, model, max_len=max_len, bos_id=bos_id, eos_id=eos_id,
               pad_id=pad_id, cached=False)
  return fn(params, images, prompt, None)


def sample(model, params, images, rng, prompt=None, *, max_len: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0, allowed: tuple = None):
  """Ancestral sampling: logits / temperature, then keep the `top_k` most likely tokens (0: all) and
  the smallest set whose probability reaches `top_p` (1.0: all). temperature=0 is greedy.
  Step t draws with `fold_in(rng, t)`; `allowed` as for `greedy`."""
  _check_len(model, prompt, max_len)
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
  fn = _jitted("sample", _loop_impl, model, max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
               cached=True, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
               allowed=allowed)
  return fn(params, images, prompt, rng)


def _length_penalty(n, alpha):
  return ((5.0 + n.astype(jnp.float32)) / 6.0) ** alpha


def _gather_cache(cache, src):
  """Reorders the self-attention KV cache ([..., B*K, L, H, hd]) to follow the surviving beams."""
  b, k = src.shape
  flat = (jnp.arange(b)[:, None] * k + src).reshape(-1)

  def gather(path, x):
    if getattr(path[-1], "key", None) in ("cached_key", "cached_value"):
      return jnp.take(x, flat, axis=x.ndim - 4)
    return x  # cross-attention keys are the same for every beam of an example; indices are shared
  return jax.tree_util.tree_map_with_path(gather, cache)


def _beam_advance(state, logits, t, plen, *, beam_size, max_len, alpha, eos_id):
  """One beam step (Hugging Face semantics): 2K candidates; an EOS candidate finishes only if it
  ranks within the top K; the top K non-EOS candidates stay alive. Returns (state, source beams)."""
  seqs, alive, fin_seq, fin_score, done = state
  b, k = alive.shape
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, -1)
  vocab = logp.shape[-1]
  pos = t + 1
  forced = pos < plen
  forced_tok = jax.lax.dynamic_index_in_dim(seqs[:, 0], pos, axis=1, keepdims=False)
  cand = alive[..., None] + logp
  hit = jnp.arange(vocab)[None, None] == forced_tok[:, None, None]
  cand = jnp.where(forced[:, None, None], jnp.where(hit, alive[..., None], NEG), cand)
  scores, idx = jax.lax.top_k(cand.reshape(b, k * vocab), 2 * k)
  beam, tok = idx // vocab, (idx % vocab).astype(seqs.dtype)
  cand_seqs = jnp.take_along_axis(seqs, beam[..., None], axis=1)
  cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, tok[..., None], pos, axis=2)
  gen_len = pos - plen + 1
  at_max = ~forced & (gen_len >= max_len)
  eos = (tok == eos_id) & ~forced[:, None]
  finish = (scores > NEG / 2) & (jnp.arange(2 * k) < k)[None] & (eos | at_max[:, None])
  new = jnp.where(finish, scores / _length_penalty(gen_len, alpha)[:, None], -jnp.inf)
  fs, fi = jax.lax.top_k(jnp.concatenate([fin_score, new], axis=1), k)
  fseq = jnp.take_along_axis(jnp.concatenate([fin_seq, cand_seqs], axis=1), fi[..., None], axis=1)
  a, ai = jax.lax.top_k(jnp.where(eos, NEG, scores), k)
  src = jnp.take_along_axis(beam, ai, axis=1)
  # No alive beam can end above its current log-prob divided by the largest penalty still ahead.
  bound = a[:, 0] / jnp.maximum(_length_penalty(gen_len + 1, alpha), _length_penalty(jnp.asarray(max_len), alpha))
  stop = done | at_max | (~forced & (fs[:, -1] > -jnp.inf) & (bound <= fs[:, -1]))
  fin_seq = jnp.where(done[:, None, None], fin_seq, fseq)
  fin_score = jnp.where(done[:, None], fin_score, fs)
  return (jnp.take_along_axis(cand_seqs, ai[..., None], axis=1), a, fin_seq, fin_score, stop), src


def _beam_impl(model, params, images, prompt, rng, *, max_len, beam_size, alpha, bos_id, eos_id, pad_id,
               return_all):
  del rng
  k = beam_size
  encode, step, _ = _fns(model, params)
  encoded = encode(images)
  b = encoded.shape[0]
  seq, plen = _start(prompt, b, max_len, bos_id, pad_id)
  length = seq.shape[1]
  encoded = jnp.repeat(encoded, k, axis=0)
  seqs = jnp.repeat(seq[:, None], k, axis=1)
  alive = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None], (b, 1))
  state = (seqs, alive, seqs, jnp.full((b, k), -jnp.inf), jnp.zeros(b, bool))
  adv = lambda st, logits, t: _beam_advance(st, logits, t, plen, beam_size=k, max_len=max_len, alpha=alpha,
                                            eos_id=eos_id)
  logits, cache = step(seqs[:, :, 0].reshape(b * k, 1), encoded, None)
  state, src = adv(state, logits, 0)
  cache = _gather_cache(cache, src)

  def body(carry):
    t, state, cache = carry
    tokens = jax.lax.dynamic_slice_in_dim(state[0], t, 1, axis=2).reshape(b * k, 1)
    logits, cache = step(tokens, None, cache)
    state, src = adv(state, logits, t)
    return t + 1, state, _gather_cache(cache, src)

  cond = lambda c: (c[0] < length - 1) & ~jnp.all(c[1][4])
  _, state, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache))
  fin_seq, fin_score = state[2], state[3]
  if return_all:
    return jax.vmap(lambda s: _generated(s, plen, max_len), in_axes=1, out_axes=1)(fin_seq), fin_score
  return _generated(fin_seq[:, 0], plen, max_len)


def beam_search(model, params, images, prompt=None, *, max_len: int, beam_size: int = 4, alpha: float = 0.6,
                bos_id: int = 1, eos_id: int = 2, pad_id: int = 0, return_all: bool = False) -> Any:
  """Beam search with the KV cache -> the best sequence per example [B, max_len].

  Finished hypotheses are ranked by log-prob / ((5 + n) / 6) ** alpha, n the number of generated
  tokens (EOS included); alpha=0 ranks by plain log-prob. With `return_all`, returns
  (tokens [B, beam_size, max_len], scores [B, beam_size]) best first; unused slots score -inf.
  """
  _check_len(model, prompt, max_len)
  if beam_size < 1:
    raise ValueError(f"beam_size must be at least 1, got {beam_size}")
  fn = _jitted("beam", _beam_impl, model, max_len=max_len, beam_size=int(beam_size), alpha=float(alpha),
               bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, return_all=return_all)
  return fn(params, images, prompt, None)



def decode_fn(name: str, **options) -> Any:
  """`fn(model, params, images, prompt=None, rng=None)` for a decoding method named in a config:
  "greedy", "beam" (options beam_size, alpha) or "sample" (temperature, top_k, top_p); options
  also take max_len and the token ids."""
  if name == "greedy":
    return lambda model, params, images, prompt=None, rng=None: greedy(model, params, images, prompt, **options)
  if name == "beam":
    return lambda model, params, images, prompt=None, rng=None: beam_search(model, params, images, prompt,
                                                                             **options)
  if name == "sample":
    def fn(model, params, images, prompt=None, rng: Optional[jax.Array] = None):
      if rng is None:
        raise ValueError("sampling needs an rng key")
      return sample(model, params, images, rng, prompt, **options)
    return fn
  raise ValueError(f"unknown decoding method {name!r}; choose 'greedy', 'beam' or 'sample'")
