"""BLEU / CIDEr-D must equal pycocoevalcap's Bleu(4) and Cider() to 1e-6."""

import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vlm_jax.metrics import caption

TOL = 1e-6


def _reference_scores(refs, hyps):
  res = {k: [v] for k, v in hyps.items()}
  bleu, _ = Bleu(4).compute_score(refs, res, verbose=0)
  cider, _ = Cider().compute_score(refs, res)
  return list(bleu), float(cider)


def _assert_equal_to_reference(refs, hyps):
  want_bleu, want_cider = _reference_scores(refs, hyps)
  got_bleu = caption.bleu(refs, hyps)
  got_cider = caption.cider(refs, hyps)
  assert len(got_bleu) == 4
  for got, want in zip(got_bleu, want_bleu):
    assert abs(got - want) <= TOL, (got_bleu, want_bleu)
  assert abs(got_cider - want_cider) <= TOL, (got_cider, want_cider)
  return got_bleu, got_cider


def _random_corpus(seed, n_examples, vocab_size):
  rng = random.Random(seed)
  vocab = [f'w{i}' for i in range(vocab_size)]

  def sentence(lo, hi):
    return ' '.join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

  refs, hyps = {}, {}
  for i in range(n_examples):
    refs[f'img{i}'] = [sentence(3, 14) for _ in range(rng.randint(2, 6))]
    # Half the hypotheses copy a chunk of a reference so higher n-grams match.
    if rng.random() < 0.5:
      words = rng.choice(refs[f'img{i}']).split()
      start = rng.randint(0, len(words) - 1)
      hyps[f'img{i}'] = ' '.join(words[start:start + rng.randint(1, 10)] +
                                 sentence(0, 3).split())
    else:
      hyps[f'img{i}'] = sentence(1, 15)
  return refs, hyps


@pytest.mark.parametrize('seed,n_examples,vocab_size',
                         [(0, 50, 8), (1, 80, 20), (2, 120, 50), (3, 60, 4)])
def test_random_corpora_match_reference(seed, n_examples, vocab_size):
  refs, hyps = _random_corpus(seed, n_examples, vocab_size)
  bleu, cider = _assert_equal_to_reference(refs, hyps)
  assert 0 < bleu[3] < 1 and cider > 0


def test_empty_hypotheses_match_reference():
  refs, hyps = _random_corpus(4, 50, 10)
  for key in list(hyps)[::3]:
    hyps[key] = ''
  _assert_equal_to_reference(refs, hyps)


def test_short_hypotheses_match_reference():
  refs, hyps = _random_corpus(5, 50, 10)
  rng = random.Random(5)
  for key in hyps:
    hyps[key] = ' '.join(hyps[key].split()[:rng.randint(1, 3)])
  bleu, _ = _assert_equal_to_reference(refs, hyps)
  assert bleu[3] < 0.01  # no 4-grams: only the 1e-15/1e-9 smoothing keeps it > 0


def test_identical_hypothesis_and_references():
  refs = {i: [f'a photo of object {i} on a table'] * 3 for i in range(50)}
  hyps = {i: refs[i][0] for i in refs}
  bleu, cider = _assert_equal_to_reference(refs, hyps)
  assert all(abs(b - 1.0) <= TOL for b in bleu)
  # CIDEr-D of an exact match: cosine 1 for every n, no length penalty, times CIDEr's scale of 10.
  assert abs(cider - 10.0) <= TOL


def test_brevity_penalty_and_closest_length_tie():
  # Hypothesis length 3 is equally close to refs of length 2 and 4.
  refs = {i: ['x y', 'x y z w'] for i in range(50)}
  refs.update({f'o{i}': [f'a b c d e {i}'] for i in range(10)})
  hyps = {k: 'x y z' if isinstance(k, int) else 'a b' for k in refs}
  _assert_equal_to_reference(refs, hyps)


def test_hypothesis_as_one_element_list_and_key_checks():
  refs, hyps = _random_corpus(6, 50, 10)
  as_lists = {k: [v] for k, v in hyps.items()}
  assert caption.bleu(refs, as_lists) == caption.bleu(refs, hyps)
  assert caption.cider(refs, as_lists) == caption.cider(refs, hyps)
  del hyps['img0']
  with pytest.raises(ValueError):
    caption.bleu(refs, hyps)
  with pytest.raises(ValueError):
    caption.cider({'a': []}, {'a': 'x'})


@pytest.mark.parametrize('text,want', [
    ('A man riding a horse.', 'a man riding a horse'),
    ("The dog's ball isn't red!", "the dog 's ball is n't red"),
    ('Two "well-known" people (3.5 m), side-by-side; ok?',
     'two well-known people 3.5 m side-by-side ok'),
    ("We can't see -- it's dark...", "we ca n't see it 's dark"),
    ('  Cats  &  DOGS\n', 'cats & dogs'),
    ('', ''),
])
def test_tokenize(text, want):
  assert caption.tokenize(text) == want
