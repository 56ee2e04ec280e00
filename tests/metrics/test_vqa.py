"""VQA answer normalisation and accuracy."""

import pytest

from vlm_jax.metrics import vqa


@pytest.mark.parametrize('answer,want', [
    ('Yes', 'yes'),
    ('Yes.', 'yes'),
    ('  two\tdogs\n', '2 dogs'),
    ('The red one', 'red 1'),
    ('an apple', 'apple'),
    ('none', '0'),
    ('Ten', '10'),
    ('3.5', '3.5'),
    ('5. ', '5'),
    ('100,978', '100978'),
    ('black-and-white', 'black and white'),
    ('t-shirt', 't shirt'),
    ('left , right', 'left right'),
    ('yes!', 'yes'),
    ('dont know', "don't know"),
    ("couldnt've", "couldn't've"),
    ("isnt", "isn't"),
    ('well', 'well'),  # an ordinary word, not "we'll"
    ("it's", "it's"),
    ('10:30', '10:30'),
    ('up/down', 'up down'),
])
def test_normalize_answer(answer, want):
  assert vqa.normalize_answer(answer) == want


def test_single_reference_is_exact_match_after_normalisation():
  assert vqa.vqa_accuracy('Two.', ['2']) == 1.0
  assert vqa.vqa_accuracy('the Cat', ['cat']) == 1.0
  assert vqa.vqa_accuracy('cats', ['cat']) == 0.0


def test_few_references_match_any():
  assert vqa.vqa_accuracy('red', ['blue', 'Red']) == 1.0
  assert vqa.vqa_accuracy('green', ['blue', 'red', 'black']) == 0.0


@pytest.mark.parametrize('n_match,want', [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                          (4, 1.0), (10, 1.0)])
def test_ten_references_leave_one_out(n_match, want):
  refs = ['yes'] * n_match + ['no'] * (10 - n_match)
  # Each of the 10 leave-one-out subsets scores min(#matches / 3, 1).
  assert vqa.vqa_accuracy('Yes', refs) == pytest.approx(want)


def test_leave_one_out_with_four_references():
  # Leaving out a match: 1/3; leaving out the non-match: min(2/3, 1).
  assert vqa.vqa_accuracy('yes', ['yes', 'yes', 'no', 'no']) == pytest.approx(
      (1 / 3 + 1 / 3 + 2 / 3 + 2 / 3) / 4)


def test_mean_and_errors():
  preds = ['yes', 'two', 'blue']
  refs = [['yes'], ['2'] * 10, ['red']]
  assert vqa.mean_vqa_accuracy(preds, refs) == pytest.approx(2 / 3)
  with pytest.raises(ValueError):
    vqa.mean_vqa_accuracy(preds, refs[:2])
  with pytest.raises(ValueError):
    vqa.vqa_accuracy('yes', [])
