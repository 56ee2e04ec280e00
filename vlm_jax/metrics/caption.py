"""Caption metrics: corpus BLEU-1..4 and CIDEr-D, plus a simple tokeniser.

`bleu` and `cider` reproduce the numbers of the COCO caption evaluation code
(pycocoevalcap `Bleu(4)` with its default "closest" reference length, and
`Cider()`, which is CIDEr-D) when both are given the same tokenised strings:
tokens are whatever `str.split()` yields. The COCO pipeline first runs the
Stanford PTB tokenizer; `tokenize` here is only a close approximation of it for
plain English, so equality with published COCO numbers holds only on
identically tokenised inputs.

Inputs are dicts keyed by example id: `references[key]` is a list of caption
strings, `hypotheses[key]` is one caption string (a one-element list is also
accepted). Both dicts must have the same keys.
"""

import collections
import math
import re
from typing import Hashable, Mapping, Sequence, Union

import numpy as np

Hypothesis = Union[str, Sequence[str]]

# The reference's smoothing: a precision with no n-grams is 1e-15 / 1e-9, not 0 / 0.
_TINY = 1e-15
_SMALL = 1e-9

# Tokens the COCO pipeline removes after PTB tokenisation (quotes, brackets and
# sentence punctuation); other symbols such as '&' or '%' are kept as tokens.
_DROPPED_PUNCT = frozenset(list('\'"`()[]{}.?!,:;-') + ['--', '...', "''", '``'])
_CLITIC_SUFFIX = r"(?:s|re|ve|ll|d|m)\b"  # 's 're 've 'll 'd 'm
_TOKEN_RE = re.compile(
    r"\w+(?=n't)|n't|'" + _CLITIC_SUFFIX +            # "do" "n't", "'s"
    r"|\w+(?:[-.]\w+|'(?!" + _CLITIC_SUFFIX + r")\w+)*" +  # words, "o'clock"
    r"|\.\.\.|--|``|''|[^\w\s]")


def tokenize(text: str) -> str:
  """Lowercases and splits `text` roughly like the PTB tokenizer + COCO cleanup.

  Clitics are split off ("don't" -> "do n't", "dog's" -> "dog 's"), words keep
  inner hyphens, dots and apostrophes ("well-known", "3.5"), and punctuation
  tokens are dropped. Returns the tokens joined by single spaces.
  """
  tokens = _TOKEN_RE.findall(text.lower())
  return ' '.join(t for t in tokens if t not in _DROPPED_PUNCT)


def _ngram_counts(words: Sequence[str], n: int) -> collections.Counter:
  counts = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def _one_hypothesis(hyp: Hypothesis) -> str:
  if isinstance(hyp, str):
    return hyp
  if len(hyp) != 1:
    raise ValueError(f'expected exactly one hypothesis, got {len(hyp)}')
  return hyp[0]


def _checked_keys(references: Mapping[Hashable, Sequence[str]],
                  hypotheses: Mapping[Hashable, Hypothesis]) -> list:
  if set(references) != set(hypotheses):
    missing = set(references) ^ set(hypotheses)
    raise ValueError(f'references and hypotheses differ in keys, e.g. {sorted(map(repr, missing))[:5]}')
  if not references:
    raise ValueError('cannot score an empty corpus')
  for key, refs in references.items():
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f'references[{key!r}] must be a non-empty list of strings')
  return list(references)


def bleu(references: Mapping[Hashable, Sequence[str]],
         hypotheses: Mapping[Hashable, Hypothesis], n: int = 4) -> list:
  """Corpus BLEU-1..n with clipped n-gram counts and a corpus brevity penalty.

  Per example, the effective reference length is the reference length closest
  to the hypothesis length (the shorter one on a tie); clipped matches, n-gram
  totals and lengths are summed over the corpus before the geometric means.
  Returns `[BLEU-1, ..., BLEU-n]`.
  """
  keys = _checked_keys(references, hypotheses)
  correct = [0] * n
  guess = [0] * n
  hyp_len_total = 0
  ref_len_total = 0
  for key in keys:
    hyp = _one_hypothesis(hypotheses[key]).split()
    refs = [r.split() for r in references[key]]
    max_ref_counts = collections.Counter()
    for ref in refs:
      for gram, count in _ngram_counts(ref, n).items():
        max_ref_counts[gram] = max(max_ref_counts[gram], count)
    for gram, count in _ngram_counts(hyp, n).items():
      correct[len(gram) - 1] += min(count, max_ref_counts[gram])
    for k in range(1, n + 1):
      guess[k - 1] += max(0, len(hyp) - k + 1)
    hyp_len_total += len(hyp)
    ref_len_total += min((len(r) for r in refs),
                         key=lambda length: (abs(length - len(hyp)), length))

  scores = []
  precision_product = 1.0
  for k in range(n):
    precision_product *= float(correct[k] + _TINY) / (guess[k] + _SMALL)
    scores.append(precision_product ** (1.0 / (k + 1)))
  ratio = (hyp_len_total + _TINY) / (ref_len_total + _SMALL)
  if ratio < 1:
    brevity_penalty = math.exp(1 - 1 / ratio)
    scores = [s * brevity_penalty for s in scores]
  return scores


def _tfidf(counts: collections.Counter, doc_freq: collections.Counter,
           log_num_docs: float, n: int):
  """TF-IDF vectors per n-gram order, their L2 norms, and the length term."""
  vectors = [{} for _ in range(n)]
  squared = [0.0] * n
  for gram, tf in counts.items():
    order = len(gram) - 1
    weight = float(tf) * (log_num_docs - np.log(max(1.0, doc_freq[gram])))
    vectors[order][gram] = weight
    squared[order] += weight ** 2
  # The reference measures caption length for the Gaussian penalty as the
  # number of bigrams (tokens - 1), not tokens; kept for equal numbers.
  length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
  return vectors, [np.sqrt(s) for s in squared], length


def cider(references: Mapping[Hashable, Sequence[str]],
          hypotheses: Mapping[Hashable, Hypothesis], n: int = 4,
          sigma: float = 6.0) -> float:
  """Corpus CIDEr-D (mean over examples), as in the COCO reference.

  IDF uses document frequencies over the evaluated corpus: an n-gram's count
  is the number of examples whose references contain it, and
  idf = log(#examples) - log(max(1, df)). Per example and n-gram order, the
  hypothesis TF-IDF vector is compared with each reference vector by a cosine
  in which hypothesis weights are clipped at the reference weights, times a
  Gaussian length penalty exp(-delta^2 / (2 sigma^2)); orders 1..n are averaged,
  references averaged, and the result scaled by 10.
  """
  keys = _checked_keys(references, hypotheses)
  ref_counts = {key: [_ngram_counts(r.split(), n) for r in references[key]]
                for key in keys}
  doc_freq = collections.Counter()
  for key in keys:
    doc_freq.update(set().union(*ref_counts[key]))
  log_num_docs = np.log(float(len(keys)))

  per_example = []
  for key in keys:
    hyp_counts = _ngram_counts(_one_hypothesis(hypotheses[key]).split(), n)
    hyp_vec, hyp_norm, hyp_len = _tfidf(hyp_counts, doc_freq, log_num_docs, n)
    total = np.zeros(n)
    for counts in ref_counts[key]:
      ref_vec, ref_norm, ref_len = _tfidf(counts, doc_freq, log_num_docs, n)
      penalty = math.exp(-float(hyp_len - ref_len) ** 2 / (2 * sigma ** 2))
      for order in range(n):
        dot = 0.0
        for gram, weight in hyp_vec[order].items():
          ref_weight = ref_vec[order].get(gram, 0.0)
          dot += min(weight, ref_weight) * ref_weight
        if hyp_norm[order] != 0 and ref_norm[order] != 0:
          dot /= hyp_norm[order] * ref_norm[order]
        total[order] += dot * penalty
    per_example.append(np.mean(total) / len(ref_counts[key]) * 10.0)
  return float(np.mean(per_example))
