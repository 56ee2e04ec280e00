"""Image<->text recall@k on hand-computed cases."""

import numpy as np
import pytest

from vlm_jax.metrics.retrieval import recall_at_k


def test_one_caption_per_image():
  # Text j belongs to image j. Rows: images, columns: texts.
  sim = np.array([
      [0.9, 0.1, 0.2],   # image 0: text 0 ranks 1st
      [0.8, 0.3, 0.7],   # image 1: text 1 ranks 3rd
      [0.1, 0.6, 0.5],   # image 2: text 2 ranks 2nd
  ])
  got = recall_at_k(sim, np.eye(3, dtype=bool), ks=(1, 2, 3))
  assert got['i2t_recall@1'] == pytest.approx(1 / 3)
  assert got['i2t_recall@2'] == pytest.approx(2 / 3)
  assert got['i2t_recall@3'] == 1.0
  # Columns: text 0 -> image 0 first; text 1 -> image 1 is 2nd (0.6 > 0.3);
  # text 2 -> image 2 is 2nd (0.7 > 0.5).
  assert got['t2i_recall@1'] == pytest.approx(1 / 3)
  assert got['t2i_recall@2'] == 1.0
  assert set(got) == {f'{d}_recall@{k}' for d in ('i2t', 't2i') for k in (1, 2, 3)}


def test_several_captions_per_image_any_match_counts():
  # Image 0 owns texts 0, 1; image 1 owns texts 2, 3.
  sim = np.array([
      [0.2, 0.9, 0.5, 0.1],  # best own text (1) is 1st
      [0.8, 0.7, 0.6, 0.1],  # best own text (2) is 3rd
  ])
  matches = [{0, 1}, {2, 3}]
  got = recall_at_k(sim, matches, ks=(1, 3))
  assert got['i2t_recall@1'] == 0.5
  assert got['i2t_recall@3'] == 1.0
  # Texts: 0 -> image 1 first (wrong), 1 -> image 0 (right),
  # 2 -> image 1 (right), 3 -> tie 0.1/0.1 scored against it.
  assert got['t2i_recall@1'] == 0.5
  assert got['t2i_recall@3'] == 1.0
  same = recall_at_k(sim, np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=bool), ks=(1, 3))
  assert same == got


def test_duplicate_caption_counts_as_match():
  # Texts 1 and 2 are the same sentence, written for images 1 and 2; the
  # caller marks both as matches of both images.
  sim = np.array([
      [0.9, 0.2, 0.1],
      [0.1, 0.3, 0.8],   # image 1 ranks text 2 (its duplicate) first
      [0.0, 0.7, 0.6],   # image 2 ranks text 1 (its duplicate) first
  ])
  strict = recall_at_k(sim, np.eye(3, dtype=bool), ks=(1,))
  assert strict['i2t_recall@1'] == pytest.approx(1 / 3)
  dup = np.eye(3, dtype=bool)
  dup[1, 2] = dup[2, 1] = True
  got = recall_at_k(sim, dup, ks=(1,))
  assert got['i2t_recall@1'] == 1.0
  # Text 1 -> image 2 (0.7), a match now; text 2 -> image 1 (0.8), a match.
  assert got['t2i_recall@1'] == 1.0


def test_constant_similarity_gets_no_credit():
  got = recall_at_k(np.zeros((4, 4)), np.eye(4, dtype=bool), ks=(1, 4))
  assert got['i2t_recall@1'] == 0.0 and got['t2i_recall@1'] == 0.0
  assert got['i2t_recall@4'] == 1.0


def test_queries_without_matches_are_an_error():
  with pytest.raises(ValueError):
    recall_at_k(np.zeros((2, 3)), [{0}, {1}])
  with pytest.raises(ValueError):
    recall_at_k(np.zeros((2, 2)), np.eye(3, dtype=bool))
