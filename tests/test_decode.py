"""Decoding loops on a random tiny captioner: cached == uncached greedy, beam 1 == greedy,
top-k 1 sampling == greedy, EOS stop and PAD after it, prompts, beam scores."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import decode
from vlm_jax.models.vlm import Captioner

MAX = 8
NO_EOS = -1
# Right-padded prompts of different lengths ([BOS] ... [SEP]-like); PAD is 0.
PROMPT = jnp.array([[1, 7, 8, 5], [1, 5, 0, 0], [1, 9, 10, 11], [1, 0, 0, 0]], jnp.int32)


@pytest.fixture(scope="module")
def tiny():
  model = Captioner(encoder=dict(patch_size=8, width=24, depth=1, mlp_dim=40, num_heads=2),
                    decoder=dict(vocab_size=13, width=32, depth=2, num_heads=4, mlp_dim=48, max_len=14))
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))

  @jax.jit
  def init():
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), images, jnp.ones((4, 3), jnp.int32)))["params"]
    # A fresh init gives near-uniform logits (argmax ties); perturb every weight so that the random
    # model's choices are clear-cut and varied.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return treedef.unflatten([x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  params = init()
  forward = jax.jit(lambda images, seqs: model.apply({"params": params}, images, seqs))
  return model, params, images, forward


def _teacher_forced(forward, images, seqs):
  """Logits of the full (uncached) forward pass; sequences are padded to one length (causal, so
  the padding changes nothing before it) to compile once."""
  seqs = np.asarray(seqs)
  padded = np.zeros((seqs.shape[0], 14), np.int32)
  padded[:, :seqs.shape[1]] = seqs
  return np.asarray(forward(images, padded))[:, :seqs.shape[1]]


def test_cached_greedy_matches_uncached(tiny):
  model, params, images, forward = tiny
  for prompt in (None, PROMPT):
    a = decode.greedy(model, params, images, prompt, max_len=MAX, eos_id=NO_EOS)
    b = decode.greedy_uncached(model, params, images, prompt, max_len=MAX, eos_id=NO_EOS)
    assert a.shape == (4, MAX)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(np.asarray(a))) > 3  # the random model does not emit one token throughout


def test_eos_stops_and_pads(tiny):
  model, params, images, forward = tiny
  free = np.asarray(decode.greedy(model, params, images, max_len=MAX, eos_id=NO_EOS))
  # Make EOS a token that some example emits before other non-PAD tokens, so that it stops early.
  eos = int(next(row[i] for row in free for i in range(1, MAX - 1) if row[i] > 2 and row[i + 1:].any()))
  out = np.asarray(decode.greedy(model, params, images, max_len=MAX, eos_id=eos))
  np.testing.assert_array_equal(out, np.asarray(decode.greedy_uncached(model, params, images, max_len=MAX,
                                                                          eos_id=eos)))
  for row_free, row in zip(free, out):
    hits = np.flatnonzero(row_free == eos)
    if len(hits):
      stop = hits[0] + 1
      np.testing.assert_array_equal(row[:stop], row_free[:stop])
      assert (row[stop:] == 0).all()
    else:
      np.testing.assert_array_equal(row, row_free)
  assert (out == 0).sum() > (free == 0).sum()  # some example stopped early


def test_prompt_is_respected(tiny):
  model, params, images, forward = tiny
  out = np.asarray(decode.greedy(model, params, images, PROMPT, max_len=MAX, eos_id=NO_EOS))
  for b in range(4):
    prompt = [int(t) for t in PROMPT[b] if t != 0]
    seq = np.array([prompt + out[b].tolist()])
    logits = _teacher_forced(forward, images[b:b + 1], seq[:, :-1])
    # Each generated token is the argmax after the prompt and the tokens before it.
    np.testing.assert_array_equal(np.argmax(logits[0, len(prompt) - 1:], -1), out[b])
    alone = decode.greedy(model, params, images[b:b + 1], PROMPT[b:b + 1], max_len=MAX, eos_id=NO_EOS)
    np.testing.assert_array_equal(alone[0], out[b])  # the other examples' prompts change nothing


def test_allowed_ranges_constrain_the_first_tokens_to_the_argmax_inside_them(tiny):
  model, params, images, forward = tiny
  allowed = ((3, 6), (3, 6), (10, 13))  # then free
  out = np.asarray(decode.greedy(model, params, images, PROMPT, max_len=MAX, eos_id=NO_EOS, allowed=allowed))
  for b in range(4):
    prompt = [int(t) for t in PROMPT[b] if t != 0]
    logits = _teacher_forced(forward, images[b:b + 1], np.array([prompt + out[b].tolist()])[:, :-1])[0]
    for k in range(MAX):
      step = logits[len(prompt) - 1 + k]
      lo, hi = allowed[k] if k < len(allowed) else (0, len(step))
      assert out[b, k] == lo + np.argmax(step[lo:hi])  # the best token inside the range
  free = np.asarray(decode.greedy(model, params, images, PROMPT, max_len=MAX, eos_id=NO_EOS))
  assert (free[:, :3] != out[:, :3]).any()  # the random model's free choices leave the ranges


def test_beam_one_is_greedy(tiny):
  model, params, images, forward = tiny
  for prompt, eos in ((None, NO_EOS), (PROMPT, NO_EOS), (None, 2), (PROMPT, 2)):
    g = decode.greedy(model, params, images, prompt, max_len=MAX, eos_id=eos)
    b = decode.beam_search(model, params, images, prompt, max_len=MAX, beam_size=1, alpha=0.0, eos_id=eos)
    np.testing.assert_array_equal(g, b)


def test_beam_scores_are_length_normalised_log_probs(tiny):
  model, params, images, forward = tiny
  alpha, eos = 0.6, 2
  seqs, scores = decode.beam_search(model, params, images, PROMPT, max_len=MAX, beam_size=3, alpha=alpha,
                                    eos_id=eos, return_all=True)
  seqs, scores = np.asarray(seqs), np.asarray(scores)
  assert seqs.shape == (4, 3, MAX) and scores.shape == (4, 3)
  assert (np.diff(scores, axis=1) <= 1e-6).all()
  best = np.asarray(decode.beam_search(model, params, images, PROMPT, max_len=MAX, beam_size=3, alpha=alpha,
                                       eos_id=eos))
  np.testing.assert_array_equal(best, seqs[:, 0])
  for b in range(4):
    prompt = [int(t) for t in PROMPT[b] if t != 0]
    gen = seqs[b, 0].tolist()
    n = gen.index(eos) + 1 if eos in gen else MAX
    assert all(t == 0 for t in gen[n:])
    logp = jax.nn.log_softmax(_teacher_forced(forward, images[b:b + 1], np.array([prompt + gen[:n - 1]])))
    total = sum(float(logp[0, len(prompt) - 1 + i, gen[i]]) for i in range(n))
    np.testing.assert_allclose(scores[b, 0], total / ((5 + n) / 6) ** alpha, rtol=1e-4)


def test_sampling(tiny):
  model, params, images, forward = tiny
  g = decode.greedy(model, params, images, PROMPT, max_len=MAX, eos_id=NO_EOS)
  key = jax.random.PRNGKey(5)
  kw = dict(max_len=MAX, eos_id=NO_EOS, temperature=1.5)
  np.testing.assert_array_equal(decode.sample(model, params, images, key, PROMPT, top_k=1, **kw), g)
  np.testing.assert_array_equal(decode.sample(model, params, images, key, PROMPT, top_p=1e-6, **kw), g)
  draws = [np.asarray(decode.sample(model, params, images, jax.random.PRNGKey(s), top_k=3, **kw))
           for s in range(3)]
  assert any((d != draws[0]).any() for d in draws[1:])
  for d in draws:  # every token is among the 3 most likely given what came before
    seq = np.concatenate([np.ones((4, 1), np.int32), d[:, :-1]], axis=1)
    logits = np.asarray(_teacher_forced(forward, images, seq))
    top3 = np.argsort(-logits, axis=-1)[..., :3]
    assert (top3 == d[..., None]).any(-1).all()


def test_decode_fn_and_errors(tiny):
  model, params, images, forward = tiny
  g = decode.greedy(model, params, images, PROMPT, max_len=MAX)
  np.testing.assert_array_equal(decode.decode_fn("greedy", max_len=MAX)(model, params, images, PROMPT), g)
  np.testing.assert_array_equal(
      decode.decode_fn("sample", max_len=MAX, top_k=1)(model, params, images, PROMPT, jax.random.PRNGKey(0)), g)
  with pytest.raises(ValueError, match="unknown decoding"):
    decode.decode_fn("nucleus")
  with pytest.raises(ValueError, match="max_len"):
    decode.greedy(model, params, images, PROMPT, max_len=11)
