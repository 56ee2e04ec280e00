"""Location tokens: boxes as `<locNNNN>` tokens (PaliGemma's layout) and back, in any tokenizer.

A box is 4 coordinates in the order y1 x1 y2 x2 (top, left, bottom, right), normalised to the image
(0 = top/left edge, 1 = bottom/right edge), or in pixels when an `image_size` (height, width) is
given. Each coordinate becomes one of NUM_BINS = 1024 tokens `<loc0000>` .. `<loc1023>`, written in
that same order. The binning rule is PaliGemma's (big_vision):

    bin   = clip(round(coord * 1023), 0, 1023)      (round half to even, as numpy and tf.round)
    coord = bin / 1023

so both image edges are exact and a round trip moves a coordinate by at most 0.5 / 1023 of the
image side. An object in a target text is its 4 location tokens followed by its label words;
objects are joined by " ; " (`format_objects`). `parse_objects` reads such a sequence back,
counting and skipping what is not a well-formed box.

`add_loc_tokens` adds the 1024 tokens to a `Tokenizer` as added tokens: never split, matched after
normalisation (so also in upper case), kept by `Tokenizer.decode`, and written with their ids into
the saved tokenizer.json. No jax and no tensorflow here.
"""

import re
from typing import NamedTuple, Sequence

import numpy as np
import tokenizers

from vlm_jax.data.tokenizer import WORD_START, Tokenizer
from vlm_jax.errors import UserError

NUM_BINS = 1024
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(NUM_BINS))
SEPARATOR = " ; "
_LOC_RE = re.compile(r"<loc(\d{4})>", re.IGNORECASE)
_LOC_RUN_GAP = re.compile(r"\s*")  # loc tokens of one box may be separated by spaces only


def _scale(image_size) -> np.ndarray:
  """Per-coordinate divisor (h, w, h, w) for pixel boxes, 1 for normalised ones."""
  if image_size is None:
    return np.ones(4)
  h, w = image_size
  if h <= 0 or w <= 0:
    raise ValueError(f"image_size must be positive (height, width), got {image_size}")
  return np.array([h, w, h, w], dtype=np.float64)


def box_to_bins(boxes, image_size=None) -> np.ndarray:
  """Boxes [..., 4] (y1 x1 y2 x2; normalised, or pixels of an image of `image_size` (h, w)) ->
  int32 bins [..., 4] in [0, 1023]. Coordinates outside the image are clipped to its edge."""
  boxes = np.asarray(boxes, dtype=np.float64)
  if boxes.shape[-1:] != (4,):
    raise ValueError(f"boxes must have 4 coordinates (y1 x1 y2 x2) in the last axis, got {boxes.shape}")
  norm = boxes / _scale(image_size)
  return np.clip(np.rint(norm * (NUM_BINS - 1)), 0, NUM_BINS - 1).astype(np.int32)


def bins_to_box(bins, image_size=None) -> np.ndarray:
  """Bins [..., 4] -> boxes [..., 4] (float64; normalised, or pixels of `image_size` (h, w))."""
  bins = np.asarray(bins)
  if bins.shape[-1:] != (4,):
    raise ValueError(f"bins must have 4 values (y1 x1 y2 x2) in the last axis, got {bins.shape}")
  return bins.astype(np.float64) / (NUM_BINS - 1) * _scale(image_size)


def bins_to_tokens(bins) -> list[str]:
  """Token strings of bins (any shape, flattened in order)."""
  return [LOC_TOKENS[int(b)] for b in np.asarray(bins).reshape(-1)]


def token_to_bin(token: str) -> int | None:
  """The bin of a `<locNNNN>` token string (any case), or None for any other string."""
  m = _LOC_RE.fullmatch(token.strip())
  if not m or int(m[1]) >= NUM_BINS:
    return None
  return int(m[1])


def format_objects(boxes, labels: Sequence[str] | None = None, image_size=None) -> str:
  """Target text of objects: "<loc>x4 label ; <loc>x4 label" (no label words if labels is None)."""
  bins = box_to_bins(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), image_size)
  if labels is not None and len(labels) != len(bins):
    raise ValueError(f"{len(bins)} boxes but {len(labels)} labels")
  parts = []
  for i, b in enumerate(bins):
    locs = "".join(bins_to_tokens(b))
    parts.append(f"{locs} {labels[i]}" if labels is not None else locs)
  return SEPARATOR.join(parts)


class Parsed(NamedTuple):
  """Objects read from a sequence: boxes [n, 4] float64 (y1 x1 y2 x2), their label words, and the
  number of broken items skipped."""
  boxes: np.ndarray
  labels: list
  broken: int


def _count_words(text: str) -> int:
  """Number of non-empty ';'-separated parts: words that belong to no box."""
  return sum(1 for part in text.split(";") if part.strip())


def parse_objects(seq, tokenizer: Tokenizer | None = None, image_size=None) -> Parsed:
  """Boxes and label words of a decoded sequence; broken box syntax is counted and skipped.

  `seq` is decoded text ("<loc0012><loc0034><loc0567><loc0890> red circle ; ..."), a sequence of
  token strings (this project's pieces: joined, with the word-start mark "▁" read as a space), or
  a sequence of token ids (then `tokenizer` is required and decodes them up to the first EOS).

  An object is a run of exactly 4 location tokens (spaces allowed between them) followed by its
  label: the text up to the next ';' or location token, stripped ("" when there is none). Each of
  these counts as one broken item and yields no object: a run of other than 4 location tokens
  (e.g. 3, then a word); a `<locNNNN>` with NNNN >= 1024; a box with y2 <= y1 or x2 <= x1; and
  each ';'-separated group of words that follows no box. Boxes are normalised, or pixels of an
  image of `image_size` (height, width).
  """
  if isinstance(seq, str):
    text = seq
  elif all(isinstance(s, str) for s in seq):
    text = "".join(seq).replace(WORD_START, " ")
  elif tokenizer is None:
    raise ValueError("parse_objects of token ids needs the tokenizer that made them")
  else:
    text = tokenizer.decode(seq)
  matches = list(_LOC_RE.finditer(text))
  runs = []  # (list of bins, start of the text after the run)
  for m in matches:
    if runs and _LOC_RUN_GAP.fullmatch(text, runs[-1][1], m.start()):
      runs[-1][0].append(int(m[1]))
      runs[-1][1] = m.end()
    else:
      runs.append([[int(m[1])], m.end()])
  broken = _count_words(text[:matches[0].start()] if matches else text)
  boxes, labels = [], []
  starts = [m.start() for m in matches]
  for bins, end in runs:
    following = text[end:next((s for s in starts if s >= end), len(text))]
    label, _, rest = following.partition(";")
    broken += _count_words(rest)
    b = np.array(bins)
    if len(b) != 4 or (b >= NUM_BINS).any() or b[2] <= b[0] or b[3] <= b[1]:
      broken += 1
      continue
    boxes.append(bins_to_box(b, image_size))
    labels.append(" ".join(label.split()))
  return Parsed(np.array(boxes, dtype=np.float64).reshape(-1, 4), labels, broken)


# -- tokenizer vocabulary -------------------------------------------------------------------------
def has_loc_tokens(tok: Tokenizer) -> bool:
  vocab = tok.backend.get_vocab(with_added_tokens=True)
  return all(t in vocab for t in LOC_TOKENS)


def add_loc_tokens(tok: Tokenizer) -> Tokenizer:
  """`tok` with the 1024 location tokens added (appended after its vocabulary, bin order).

  Returns `tok` itself when it already holds them all; otherwise a new Tokenizer (the one given is
  unchanged) whose ids of existing tokens are the same. The tokens are matched before
  pre-tokenisation, so never split, and absorb the space before them (" ; <loc0001>" costs no
  word-start token). Deterministic: the same tokenizer always gets the same ids.
  """
  if has_loc_tokens(tok):
    return tok
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  backend.add_tokens([tokenizers.AddedToken(t, single_word=False, lstrip=True, rstrip=False,
                                            normalized=True, special=False) for t in LOC_TOKENS])
  return Tokenizer(backend, source=tok.source)


def loc_token_ids(tok: Tokenizer) -> np.ndarray:
  """int32 [1024]: the id of `<locNNNN>` at index NNNN."""
  ids = [tok.backend.token_to_id(t) for t in LOC_TOKENS]
  if any(i is None for i in ids):
    raise UserError(f"tokenizer {tok.source} has no location tokens (<loc0000>..<loc1023>), which "
                    f"detection and grounding need. Add them with "
                    f"vlm_jax.data.loc_tokens.add_loc_tokens, or train without input.tokenizer set.")
  return np.array(ids, dtype=np.int32)
