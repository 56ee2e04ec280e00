"""Image<->text retrieval recall@k from a similarity matrix.

A query is correct at k when ANY of its ground-truth matches ranks within the
top k. The caller decides what matches: an image usually matches all of its
captions, and two captions with identical text can both be marked as matches.
Ties are scored pessimistically: a non-matching candidate whose score equals
the best matching score ranks ahead of it, so a constant similarity does not
earn credit. Without ties this is plain top-k.
"""

from typing import Iterable, Sequence, Union

import numpy as np

Matches = Union[np.ndarray, Sequence[Iterable[int]]]

# Rows processed at once, to bound the size of the [rows, candidates] temporaries.
_CHUNK = 1024


def _match_matrix(matches: Matches, shape) -> np.ndarray:
  if isinstance(matches, np.ndarray) and matches.ndim == 2:
    if matches.shape != shape:
      raise ValueError(f'match matrix shape {matches.shape} != similarity shape {shape}')
    return matches.astype(bool)
  if len(matches) != shape[0]:
    raise ValueError(f'{len(matches)} match sets for {shape[0]} images')
  out = np.zeros(shape, dtype=bool)
  for i, texts in enumerate(matches):
    out[i, list(texts)] = True
  return out


def _ranks(sim: np.ndarray, match: np.ndarray) -> np.ndarray:
  """Per query row: how many non-matching candidates score >= its best match."""
  if not match.any(axis=1).all():
    missing = np.flatnonzero(~match.any(axis=1))
    raise ValueError(f'queries without any ground-truth match, e.g. {missing[:5].tolist()}')
  ranks = np.empty(sim.shape[0], dtype=np.int64)
  for start in range(0, sim.shape[0], _CHUNK):
    s = sim[start:start + _CHUNK]
    m = match[start:start + _CHUNK]
    best = np.where(m, s, -np.inf).max(axis=1, keepdims=True)
    ranks[start:start + _CHUNK] = ((s >= best) & ~m).sum(axis=1)
  return ranks


def recall_at_k(sim: np.ndarray, img_to_txt_matches: Matches,
                ks: Sequence[int] = (1, 5, 10)) -> dict:
  """Recall@k in both directions.

  Args:
    sim: [n_img, n_txt] similarity scores (higher is more similar).
    img_to_txt_matches: [n_img, n_txt] bool matrix, or one iterable of text
      indices per image. Every image and every text needs at least one match.
    ks: cut-offs.

  Returns:
    {'i2t_recall@K': fraction of images with a matching text in their top K,
     't2i_recall@K': fraction of texts with a matching image in their top K}
    for each K, as Python floats in [0, 1].
  """
  sim = np.asarray(sim, dtype=np.float64)
  if sim.ndim != 2:
    raise ValueError(f'sim must be [n_img, n_txt], got shape {sim.shape}')
  match = _match_matrix(img_to_txt_matches, sim.shape)
  i2t = _ranks(sim, match)
  t2i = _ranks(sim.T, match.T)
  out = {}
  for k in ks:
    out[f'i2t_recall@{k}'] = float(np.mean(i2t < k))
    out[f't2i_recall@{k}'] = float(np.mean(t2i < k))
  return out
