"""Text tokenizer: training, encoding/decoding, fixed-length sequences.

Owns everything between text and integer token arrays; no jax and no tensorflow here, so loading a
tokenizer stays light. Which tokenizer a run uses (and training one on a dataset's texts) is
`data.tokenizer_source`.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` whose vocabulary starts with the special
tokens, in this order and at these ids when trained here:

    <pad>=0  <bos>=1  <eos>=2  <mask>=3 (CapPa parallel prediction)  <unk>=4  <sep>=5 (VQA)

Text handling (the same for every model kind):
  normaliser     NFKC, lowercase, runs of whitespace -> one space, stripped ends;
  pre-tokeniser  Metaspace ("▁" marks a word start, also for the first word) then every
                 punctuation character on its own, so "left, a" -> "▁left" "," "▁a";
  decoder        Metaspace: "▁" -> space, so decoding restores the normalised text exactly
                 (no space is invented before punctuation, none is dropped).
Hence `decode(encode(t)) == normalize_text(t)` for any text whose characters are all known.

Model kinds for `train_tokenizer`:
  "wordpiece" (default)  WordPiece vocabulary learned by the WordPiece trainer with an empty
                 continuation prefix; the alphabet always holds a-z, 0-9, ASCII punctuation and
                 "▁", so an unseen ASCII word is spelled in known pieces; a word containing a
                 character outside the vocabulary becomes one <unk>.
  "bpe"          byte-pair merges over the same alphabet (an unknown character -> <unk>).
  "wordlevel"    one id per pre-tokenised piece seen in training, anything else -> <unk>.
Training is deterministic: the same texts (in any order) give byte-identical tokenizer.json.
(The "##" continuation prefix is avoided on purpose: the Rust trainers number "##x" pieces in hash
order, which makes their merges, and the vocabulary, differ between processes.)

Sequence conventions (numpy int32 arrays, padded with pad_id=0 on the right):
  captions  `make_sequences`: [BOS] content [EOS] pad...; content is cut so that BOS + content +
            EOS fits max_len (EOS is always kept); an empty text gives [BOS][EOS].
  VQA       `prompt_answer_sequences`: [BOS] question [SEP] answer [EOS] pad...; the answer is
            kept before the question when cutting. For a decoder trained with teacher forcing,
                inputs  = tokens[:, :-1]
                targets = tokens[:, 1:]
            and `loss_mask` (shape [N, max_len - 1]) is aligned with `targets`: 1 exactly where the
            target is an answer token or the final EOS, 0 on the question, SEP and padding.
            `prompt_len` = 2 + len(question) is the number of leading tokens up to and including
            SEP: decoding feeds tokens[:, :prompt_len] and generates from position prompt_len.
            `prompt_sequences` builds that prompt alone (for prediction).
"""

import logging
import os
import string
import tempfile
import unicodedata
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from vlm_jax.errors import UserError

PAD, BOS, EOS, MASK, UNK, SEP = "<pad>", "<bos>", "<eos>", "<mask>", "<unk>", "<sep>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK, UNK, SEP)
# Ids given to the special tokens by `train_tokenizer` (a loaded file must have <pad> at 0).
PAD_ID, BOS_ID, EOS_ID, MASK_ID, UNK_ID, SEP_ID = range(len(SPECIAL_TOKENS))
KINDS = ("wordpiece", "bpe", "wordlevel")
WORD_START = "▁"
# Always in the vocabulary of the sub-word kinds, so unseen ASCII words never become <unk>.
_ALPHABET = tuple(string.ascii_lowercase + string.digits + string.punctuation) + (WORD_START,)
TOKENIZER_FILE = "tokenizer.json"

log = logging.getLogger(__name__)


def texts(batch: dict, key: str) -> list:
  """A batch's text field (fixed-width UTF-8 byte rows, zero padded) back as Python strings."""
  return [bytes(row).rstrip(b"\0").decode("utf-8", "ignore") for row in np.asarray(batch[key])]


def normalize_text(text: str) -> str:
  """The normalisation applied before tokenising: NFKC, lowercase, single spaces, stripped.

  `Tokenizer.decode(tok.encode(t)) == normalize_text(t)` when every character of t is known.
  """
  return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _pipeline(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """Sets the shared normaliser, pre-tokeniser and decoder (see the module docstring)."""
  backend.normalizer = normalizers.Sequence([
      normalizers.NFKC(),
      normalizers.Lowercase(),
      normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
      normalizers.Strip(),
  ])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True),
      pre_tokenizers.Punctuation(behavior="isolated"),
  ])
  backend.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
  return backend


class Tokenizer:
  """A `tokenizers.Tokenizer` with this project's special tokens and sequence helpers.

  Build one with `train_tokenizer`, `Tokenizer.load` or `tokenizer_source.tokenizer_for_dataset`; the constructor
  takes a backend `tokenizers.Tokenizer` and checks that it holds all special tokens, <pad> at 0.
  """

  def __init__(self, backend: tokenizers.Tokenizer, source: str = "<memory>"):
    ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise UserError(
          f"tokenizer {source} lacks the special tokens {', '.join(missing)} (it needs "
          f"{', '.join(SPECIAL_TOKENS)}). It was not made by vlm_jax: train one with "
          f"vlm_jax.data.tokenizer.train_tokenizer, or delete the file so it is rebuilt.")
    if ids[PAD] != 0:
      raise UserError(f"tokenizer {source} has {PAD} at id {ids[PAD]}, expected 0. Train a new "
                      f"one with vlm_jax.data.tokenizer.train_tokenizer.")
    self._tok = backend
    self.source = source
    self._ids = ids
    self._special_ids = frozenset(ids.values())
    self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

  # -- ids -------------------------------------------------------------------------------------
  @property
  def pad_id(self) -> int:
    return self._ids[PAD]

  @property
  def bos_id(self) -> int:
    return self._ids[BOS]

  @property
  def eos_id(self) -> int:
    return self._ids[EOS]

  @property
  def mask_id(self) -> int:
    return self._ids[MASK]

  @property
  def unk_id(self) -> int:
    return self._ids[UNK]

  @property
  def sep_id(self) -> int:
    return self._ids[SEP]

  @property
  def special_ids(self) -> frozenset:
    return self._special_ids

  @property
  def vocab_size(self) -> int:
    """Number of ids (specials included); every id is in [0, vocab_size)."""
    return self._vocab_size

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The wrapped Hugging Face `tokenizers.Tokenizer` (do not modify it)."""
    return self._tok

  def __len__(self) -> int:
    return self._vocab_size

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, model={type(self._tok.model).__name__})"

  # -- text <-> ids ----------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without BOS/EOS."""
    return self._tok.encode(as_str(text), add_special_tokens=False).ids

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    encs = self._tok.encode_batch([as_str(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in encs]

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS; special tokens (<unk> too) and unknown ids are skipped.

    `ids` may be a list or a 1-D numpy array (e.g. a row of decoder output, whose vocabulary may
    be padded beyond `vocab_size`). The result is normalised text: lowercase, single spaces.
    """
    kept = []
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if 0 <= i < self._vocab_size and i not in self._special_ids:
        kept.append(i)
    return " ".join(self._tok.decode(kept, skip_special_tokens=True).split())

  def decode_batch(self, ids_batch) -> list[str]:
    return [self.decode(ids) for ids in ids_batch]

  # -- fixed-length arrays ---------------------------------------------------------------------
  def caption_sequences(self, texts: Iterable[str], max_len: int, bos: bool = True,
                        eos: bool = True) -> tuple[np.ndarray, np.int32]:
    """`make_sequences(self.encode_batch(texts), ...)` with this tokenizer's special ids."""
    return make_sequences(self.encode_batch(texts), max_len, bos, eos, pad_id=self.pad_id,
                          bos_id=self.bos_id, eos_id=self.eos_id)

  def vqa_sequences(self, questions: Iterable[str], answers: Iterable[str],
                    max_len: int) -> "VqaSequences":
    """`prompt_answer_sequences` of texts with this tokenizer's special ids."""
    return prompt_answer_sequences(self.encode_batch(questions), self.encode_batch(answers),
                                   max_len, **self._sequence_ids())

  def prompt_sequences(self, questions: Iterable[str],
                       max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`prompt_sequences` of texts with this tokenizer's special ids."""
    return prompt_sequences(self.encode_batch(questions), max_len, **self._sequence_ids())

  def _sequence_ids(self) -> dict:
    return dict(pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id, sep_id=self.sep_id)

  # -- files -----------------------------------------------------------------------------------
  def to_json(self) -> str:
    """The tokenizer.json text (deterministic for a given tokenizer)."""
    return self._tok.to_str(pretty=True)

  def save(self, path: str) -> str:
    """Writes tokenizer.json to `path` (a file, or a directory that gets `tokenizer.json`).

    Written atomically (temporary file + rename). Returns the file path.
    """
    path = os.path.expanduser(path)
    if os.path.isdir(path):
      path = os.path.join(path, TOKENIZER_FILE)
    write_atomic(path, self.to_json())
    return path

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Reads a tokenizer.json written by `save` (`path` may also be the directory holding it)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
      path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise UserError(f"tokenizer file '{path}' does not exist. Point to the tokenizer.json saved "
                      f"with the model (in the training workdir), or train one with "
                      f"vlm_jax.data.tokenizer.train_tokenizer.")
    try:
      backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exception on bad JSON
      raise UserError(f"tokenizer file '{path}' is not a valid tokenizer.json ({e}). Delete it "
                      f"so it is rebuilt, or restore it from the training workdir.") from None
    return cls(backend, source=f"'{path}'")


def as_str(text) -> str:
  if isinstance(text, bytes):
    return text.decode("utf-8")
  if not isinstance(text, str):
    raise TypeError(f"expected text (str or bytes), got {type(text).__name__}")
  return text


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a hidden temporary file and `os.replace`: a reader sees the
  old or the new file, never a cut-short one."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# -- training ------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000,
                    kind: str = "wordpiece") -> Tokenizer:
  """Learns a tokenizer of `kind` ("wordpiece", "bpe" or "wordlevel") from `texts`.

  `vocab_size` counts the special tokens; the sub-word kinds always keep their base alphabet
  (6 specials + 69 characters), so they can end up larger than a tiny `vocab_size`. A corpus
  with fewer distinct pieces than `vocab_size` gives a smaller vocabulary. Deterministic.
  """
  if kind not in KINDS:
    raise UserError(f"unknown tokenizer kind '{kind}'; choose one of {', '.join(KINDS)}.")
  if vocab_size <= len(SPECIAL_TOKENS):
    raise UserError(f"tokenizer vocab_size {vocab_size} is too small: it must exceed the "
                    f"{len(SPECIAL_TOKENS)} special tokens.")
  specials = list(SPECIAL_TOKENS)
  if kind == "wordpiece":
    backend = tokenizers.Tokenizer(models.WordPiece(
        unk_token=UNK, continuing_subword_prefix="", max_input_chars_per_word=100))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=0, special_tokens=specials,
        initial_alphabet=list(_ALPHABET), continuing_subword_prefix="", show_progress=False)
  elif kind == "bpe":
    backend = tokenizers.Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, special_tokens=specials,
        initial_alphabet=list(_ALPHABET), show_progress=False)
  else:
    backend = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=0, special_tokens=specials, show_progress=False)
  _pipeline(backend)
  backend.train_from_iterator((as_str(t) for t in texts), trainer=trainer)
  return Tokenizer(backend, source=f"trained ({kind})")


# -- fixed-length sequences ----------------------------------------------------------------------
def _check_len(max_len: int, minimum: int, what: str) -> None:
  if max_len < minimum:
    raise UserError(f"{what} max_len={max_len} is too short: it needs at least {minimum} "
                    f"positions for the special tokens. Increase the text length in the config.")


def make_sequences(ids_list: Sequence[Sequence[int]], max_len: int, bos: bool = True,
                   eos: bool = True, *, pad_id: int = PAD_ID, bos_id: int = BOS_ID,
                   eos_id: int = EOS_ID) -> tuple[np.ndarray, np.int32]:
  """Pads token id lists into [N, max_len] int32: [BOS] content [EOS] pad...

  Content is cut so that BOS + content + EOS fits (EOS is kept). Returns the array and the
  number of sequences that were cut. An empty id list gives [BOS][EOS] (or nothing at all).
  """
  n_special = int(bos) + int(eos)
  _check_len(max_len, max(n_special, 1), "caption")
  budget = max_len - n_special
  out = np.full((len(ids_list), max_len), pad_id, dtype=np.int32)
  truncated = 0
  for row, ids in enumerate(ids_list):
    ids = list(ids)
    if len(ids) > budget:
      ids = ids[:budget]
      truncated += 1
    seq = ([bos_id] if bos else []) + ids + ([eos_id] if eos else [])
    out[row, :len(seq)] = seq
  return out, np.int32(truncated)


class VqaSequences(NamedTuple):
  """Teacher-forcing arrays for question -> answer (see the module docstring for conventions)."""
  tokens: np.ndarray      # int32 [N, max_len]: [BOS] question [SEP] answer [EOS] pad...
  loss_mask: np.ndarray   # int32 [N, max_len - 1], aligned with targets = tokens[:, 1:]
  prompt_len: np.ndarray  # int32 [N]: 2 + len(question kept), i.e. BOS..SEP inclusive
  truncated: np.int32     # number of examples whose question or answer was cut


def prompt_answer_sequences(question_ids: Sequence[Sequence[int]],
                            answer_ids: Sequence[Sequence[int]], max_len: int, *,
                            pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                            sep_id: int = SEP_ID) -> VqaSequences:
  """[BOS] question [SEP] answer [EOS], padded to max_len, with a loss mask on answer + EOS.

  <sep> always ends the prompt (whether or not the question ends in "?"), so the prompt boundary
  is explicit. When too long the answer is kept first (it is the target) and the question cut
  at its end; only if the answer alone does not fit is it cut too (EOS is always kept).
  """
  if len(question_ids) != len(answer_ids):
    raise ValueError(f"{len(question_ids)} questions but {len(answer_ids)} answers")
  _check_len(max_len, 3, "VQA")
  budget = max_len - 3  # BOS, SEP, EOS
  n = len(question_ids)
  tokens = np.full((n, max_len), pad_id, dtype=np.int32)
  loss_mask = np.zeros((n, max_len - 1), dtype=np.int32)
  prompt_len = np.zeros((n,), dtype=np.int32)
  truncated = 0
  for row, (q, a) in enumerate(zip(question_ids, answer_ids)):
    q, a = list(q), list(a)
    a_keep = a[:budget]
    q_keep = q[:budget - len(a_keep)]
    truncated += int(len(a_keep) < len(a) or len(q_keep) < len(q))
    seq = [bos_id] + q_keep + [sep_id] + a_keep + [eos_id]
    tokens[row, :len(seq)] = seq
    p = len(q_keep) + 2
    prompt_len[row] = p
    # targets[t] = tokens[t + 1]: the answer + EOS occupy tokens[p : p + len(a_keep) + 1].
    loss_mask[row, p - 1:p + len(a_keep)] = 1
  return VqaSequences(tokens, loss_mask, prompt_len, np.int32(truncated))


def prompt_sequences(question_ids: Sequence[Sequence[int]], max_len: int, *,
                     pad_id: int = PAD_ID, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                     sep_id: int = SEP_ID) -> tuple[np.ndarray, np.ndarray]:
  """Prompts for answer decoding: ([N, max_len] int32 [BOS] question [SEP] pad..., prompt_len [N]).

  The question is cut to max_len - 3 tokens so at least one answer token and EOS still fit;
  generation writes from position prompt_len on.
  """
  del eos_id  # same keyword set as prompt_answer_sequences
  _check_len(max_len, 3, "VQA")
  tokens = np.full((len(question_ids), max_len), pad_id, dtype=np.int32)
  prompt_len = np.zeros((len(question_ids),), dtype=np.int32)
  for row, q in enumerate(question_ids):
    seq = [bos_id] + list(q)[:max_len - 3] + [sep_id]
    tokens[row, :len(seq)] = seq
    prompt_len[row] = len(seq)
  return tokens, prompt_len
