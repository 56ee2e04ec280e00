"""Tests of location tokens: binning, target text, parsing back, tokenizer vocabulary, HF export."""

import json

import numpy as np
import pytest

from vlm_jax.data import loc_tokens as L, tokenizer as T
from vlm_jax.data.builders import shapes_scene as S
from vlm_jax.errors import UserError
from vlm_jax.hf.tokenizer import hf_fast_tokenizer


@pytest.fixture(scope="module")
def base_tok():
  texts = []
  for i in range(100):
    ex = S.make_example(0, i, image_size=8)
    texts += [ex["caption"]] + [p["question"] for p in ex["qa"]]
  return T.train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def loc_tok(base_tok):
  return L.add_loc_tokens(base_tok)


def _random_boxes(rng, n):
  a, b = rng.uniform(0, 1, (2, n, 2))
  lo, hi = np.minimum(a, b), np.maximum(a, b) + 0.01
  return np.clip(np.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], axis=1), 0, 1)


def test_binning_rule_and_edges():
  np.testing.assert_array_equal(L.box_to_bins([0.0, 1.0, 0.5, 1 / 1023]), [0, 1023, 512, 1])
  # Just below / above the middle between bins 0 and 1; outside the image clips to its edge.
  np.testing.assert_array_equal(L.box_to_bins([0.49 / 1023, 0.51 / 1023, -0.2, 1.3]), [0, 1, 0, 1023])
  np.testing.assert_allclose(L.bins_to_box([0, 1023, 512, 1]), [0.0, 1.0, 512 / 1023, 1 / 1023])
  assert L.LOC_TOKENS[7] == "<loc0007>" and len(L.LOC_TOKENS) == 1024
  assert L.bins_to_tokens([[1, 23], [456, 1023]]) == ["<loc0001>", "<loc0023>", "<loc0456>", "<loc1023>"]
  assert [L.token_to_bin(t) for t in ("<loc0042>", "<LOC1023>", "<loc1024>", "red", "<loc042>")] == [
      42, 1023, None, None, None]


def test_round_trip_within_one_bin_normalised_and_pixels():
  rng = np.random.default_rng(0)
  boxes = _random_boxes(rng, 500)
  back = L.bins_to_box(L.box_to_bins(boxes))
  assert np.abs(back - boxes).max() <= 0.5 / 1023 + 1e-12
  # Pixels of a 480 x 640 image: y scaled by the height, x by the width.
  px = boxes * [480, 640, 480, 640]
  back_px = L.bins_to_box(L.box_to_bins(px, image_size=(480, 640)), image_size=(480, 640))
  err = np.abs(back_px - px)
  assert err[:, [0, 2]].max() <= 480 * 0.5 / 1023 + 1e-9
  assert err[:, [1, 3]].max() <= 640 * 0.5 / 1023 + 1e-9
  np.testing.assert_array_equal(L.box_to_bins(px, (480, 640)), L.box_to_bins(boxes))


def test_text_and_token_round_trip(loc_tok):
  rng = np.random.default_rng(1)
  boxes = _random_boxes(rng, 6)
  labels = ["red circle", "small blue square", "the large white diamond", "a", "green", "triangle"]
  text = L.format_objects(boxes, labels)
  assert text.count(";") == 5 and text.startswith("".join(L.bins_to_tokens(L.box_to_bins(boxes[0]))))
  ids = loc_tok.encode(text)
  for parsed in (L.parse_objects(text), L.parse_objects(np.array(ids), loc_tok),
                 L.parse_objects(ids + [loc_tok.eos_id, 17], loc_tok)):
    assert parsed.labels == labels and parsed.broken == 0
    assert np.abs(parsed.boxes - boxes).max() <= 0.5 / 1023 + 1e-12
  # Each location token is one id: 4 per box.
  loc_ids = set(L.loc_token_ids(loc_tok).tolist())
  assert sum(i in loc_ids for i in ids) == 24
  # Token strings (e.g. from HF convert_ids_to_tokens) parse the same boxes.
  pieces = [loc_tok.backend.id_to_token(i) for i in ids]
  assert "▁red" in pieces
  parsed = L.parse_objects(pieces)
  assert parsed.labels == labels and parsed.broken == 0
  np.testing.assert_array_equal(parsed.boxes, L.parse_objects(text).boxes)
  # Pixel boxes out.
  px = L.parse_objects(text, image_size=(100, 200)).boxes
  np.testing.assert_allclose(px, L.parse_objects(text).boxes * [100, 200, 100, 200])


def test_broken_syntax_is_counted_and_skipped():
  good = "<loc0010><loc0020><loc0300><loc0400>"
  cases = {
      f"{good} red circle": (1, 0),
      f"<loc0010><loc0020><loc0300> red circle ; {good} blue": (1, 1),       # 3 locs then a word
      f"{good}<loc0005> red": (0, 1),                                         # 5 locs
      f"red circle ; {good} blue": (1, 1),                                    # words before any box
      f"{good} blue ; square ; {good}": (2, 1),                               # words with no box
      "<loc0300><loc0020><loc0010><loc0400> x": (0, 1),                       # y2 <= y1
      "<loc0010><loc0020><loc0300><loc0020> x": (0, 1),                       # x2 <= x1
      "<loc0010><loc0020><loc0300><loc1500> x": (0, 1),                       # no such bin
      "<loc0010> <loc0020>  <loc0300> <loc0400>square": (1, 0),               # spaces inside a box
      "": (0, 0),
      "nothing here": (0, 1),
  }
  for text, (n_objects, broken) in cases.items():
    parsed = L.parse_objects(text)
    assert (len(parsed.labels), parsed.broken) == (n_objects, broken), text
    assert parsed.boxes.shape == (n_objects, 4)
  parsed = L.parse_objects(f"<loc0001><loc0002><loc0003> x ; {good}  blue   square ;")
  assert parsed.labels == ["blue square"] and parsed.broken == 1
  np.testing.assert_allclose(parsed.boxes, [[10 / 1023, 20 / 1023, 300 / 1023, 400 / 1023]])
  assert L.parse_objects(good).labels == [""]  # a grounding answer: a box and no words


def test_parse_ids_needs_the_tokenizer():
  with pytest.raises(ValueError, match="tokenizer"):
    L.parse_objects([5, 6, 7])


def test_add_loc_tokens_is_idempotent_and_keeps_ids(base_tok, loc_tok):
  assert not L.has_loc_tokens(base_tok) and L.has_loc_tokens(loc_tok)
  assert L.add_loc_tokens(loc_tok) is loc_tok
  assert loc_tok.vocab_size == base_tok.vocab_size + 1024
  # Appended in bin order after the existing vocabulary, whose ids do not move.
  np.testing.assert_array_equal(L.loc_token_ids(loc_tok), np.arange(1024) + base_tok.vocab_size)
  base_vocab = base_tok.backend.get_vocab(with_added_tokens=True)
  loc_vocab = loc_tok.backend.get_vocab(with_added_tokens=True)
  assert {t: loc_vocab[t] for t in base_vocab} == base_vocab
  text = "a red circle in the top left, a small blue square to its left"
  assert loc_tok.encode(text) == base_tok.encode(text)
  assert loc_tok.decode(loc_tok.encode(text)) == T.normalize_text(text)
  # Deterministic: extending the same tokenizer again gives the same file.
  assert L.add_loc_tokens(base_tok).to_json() == loc_tok.to_json()
  with pytest.raises(UserError, match="add_loc_tokens"):
    L.loc_token_ids(base_tok)


def test_loc_tokens_are_never_split(loc_tok):
  ids = loc_tok.encode("circle<loc0001>square <LOC0002> <loc0003>.<loc1023>")
  pieces = [loc_tok.backend.id_to_token(i) for i in ids]
  assert [p for p in pieces if "loc" in p] == ["<loc0001>", "<loc0002>", "<loc0003>", "<loc1023>"]
  assert "<" not in pieces and ">" not in pieces
  # The space before a location token costs no token of its own.
  assert len(loc_tok.encode("red ; <loc0001>")) == len(loc_tok.encode("red ;<loc0001>"))


def test_saved_and_reloaded_with_identical_ids(loc_tok, tmp_path):
  path = loc_tok.save(str(tmp_path))
  again = T.Tokenizer.load(path)
  assert again.backend.get_vocab(with_added_tokens=True) == loc_tok.backend.get_vocab(with_added_tokens=True)
  np.testing.assert_array_equal(L.loc_token_ids(again), L.loc_token_ids(loc_tok))
  assert L.add_loc_tokens(again) is again
  with open(path) as f:
    recorded = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
  assert recorded["<loc0000>"] == loc_tok.vocab_size - 1024 and recorded["<loc1023>"] == loc_tok.vocab_size - 1
  text = L.format_objects([[0.1, 0.2, 0.3, 0.4]], ["white diamond"])
  assert again.encode(text) == loc_tok.encode(text)


def test_hugging_face_tokenizer_keeps_loc_tokens(loc_tok, tmp_path):
  from transformers import PreTrainedTokenizerFast  # the HF export's tokenizer class
  path = loc_tok.save(str(tmp_path))
  exported = tmp_path / "hf"
  hf_fast_tokenizer(loc_tok).save_pretrained(str(exported))
  loaded = (PreTrainedTokenizerFast(tokenizer_file=path),
            PreTrainedTokenizerFast.from_pretrained(str(exported)))
  loc1 = int(L.loc_token_ids(loc_tok)[1])
  text = L.format_objects([[0.25, 0.5, 0.75, 1.0]], ["red circle"])
  for hf in loaded:
    assert hf.encode("<loc0001>", add_special_tokens=False) == [loc1]
    assert hf.convert_ids_to_tokens([loc1]) == ["<loc0001>"]
    assert hf.decode([loc1]) == "<loc0001>"
    ids = hf.encode(text, add_special_tokens=False)
    assert ids == loc_tok.encode(text)
    parsed = L.parse_objects(hf.decode(ids, skip_special_tokens=True))
    assert parsed.labels == ["red circle"] and parsed.broken == 0
    np.testing.assert_allclose(parsed.boxes, [[256 / 1023, 512 / 1023, 767 / 1023, 1.0]])
