"""Which tokenizer a run uses, and the tokenizer of a tfds dataset.

A run's tokenizer (`for_run`) is `input.tokenizer` if set, else the `init_from` run's (or Hugging
Face folder's) tokenizer.json, else one trained on the dataset's captions, questions and answers
and cached next to the prepared data (`tokenizer_for_dataset`). `check_same` refuses a tokenizer
other than the one a checkpoint was trained with (resume, init_from): token ids would mean other
words. Tokenizer mechanics live in `data.tokenizer`.
"""

import logging
import os
from typing import Iterable, Sequence

import numpy as np

from vlm_jax.data import sources, tokenizer as tokenizer_lib
from vlm_jax.errors import UserError

log = logging.getLogger(__name__)

# Text features read by `tokenizer_for_dataset`: "a/b" is feature b inside (a sequence of) dict a.
# Covers `shapes` (caption, qa), coco_captions (captions/text) and simple VQA-style datasets.
DEFAULT_TEXT_KEYS = ("caption", "captions/text", "qa/question", "qa/answer", "question",
                     "answer", "answers", "text")


# -- a tfds dataset's texts ---------------------------------------------------------------------
def _lookup_feature(features, path: str):
  """The feature at "a/b" (through Sequence features), or None."""
  import tensorflow_datasets as tfds  # TensorFlow only where a dataset is read: a run's tokenizer.json loads without it
  node = features
  for part in path.split("/"):
    while isinstance(node, tfds.features.Sequence):
      node = node.feature
    if not isinstance(node, tfds.features.FeaturesDict) or part not in node.keys():
      return None
    node = node[part]
  return node


def _strings(value):
  """Every string inside a decoded value (bytes, numpy arrays of bytes, nested dicts)."""
  if isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, (bytes, str)):
    yield tokenizer_lib.as_str(value)
  elif isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
    for v in value.reshape(-1):
      yield from _strings(v)
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _strings(v)


def _get_path(example: dict, path: str):
  node = example
  for part in path.split("/"):
    node = node[part]
  return node


def dataset_texts(builder, split: str = "train",
                  text_keys: Sequence[str] = DEFAULT_TEXT_KEYS) -> Iterable[str]:
  """Yields the texts of `split` under `text_keys` (those the dataset has), images never decoded."""
  import tensorflow_datasets as tfds  # TensorFlow only where a dataset is read
  features = builder.info.features
  paths = [k for k in text_keys if _lookup_feature(features, k) is not None]
  # A key nested in another one ("captions/text" vs "captions") would yield its texts twice.
  paths = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]
  if not paths:
    raise UserError(f"dataset '{builder.info.full_name}' has none of the text features "
                    f"{', '.join(text_keys)} to train a tokenizer on (it has "
                    f"{', '.join(features.keys())}). Use a dataset with captions or questions.")
  if split not in builder.info.splits:
    raise UserError(f"dataset '{builder.info.full_name}' has no split '{split}' to train a "
                    f"tokenizer on; it has {', '.join(builder.info.splits.keys())}.")
  # Top-level images stay undecoded (tfds' PartialDecoding would do more, but reads the
  # deprecated FeatureConnector.dtype and logs a warning per feature).
  skip = {k: tfds.decode.SkipDecoding() for k, f in features.items()
          if isinstance(f, (tfds.features.Image, tfds.features.Video))}
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    examples = builder.as_data_source(split=split, decoders=skip or None)
  else:
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=skip or None,
                            read_config=tfds.ReadConfig(try_autocache=False))
    examples = tfds.as_numpy(ds)
  for ex in examples:
    for path in paths:
      yield from _strings(_get_path(ex, path))


def cache_path(builder, vocab_size: int, kind: str = "wordpiece") -> str:
  """Where `tokenizer_for_dataset` keeps the tokenizer: next to the prepared data."""
  return os.path.join(builder.data_dir, f"tokenizer_{kind}_v{vocab_size}.json")


def tokenizer_for_dataset(builder_or_name, data_dir: str | None = None, vocab_size: int = 1000,
                          kind: str = "wordpiece", split: str = "train",
                          text_keys: Sequence[str] = DEFAULT_TEXT_KEYS) -> tokenizer_lib.Tokenizer:
  """The tokenizer trained on `split`'s texts of a prepared tfds dataset, cached next to the data.

  `builder_or_name` is a prepared `tfds.core.DatasetBuilder` or a name such as "shapes/tiny"
  (embedded datasets are built on demand, see `sources.open_source`; data_dir is then required).
  The first call trains on the captions, questions and answers (`text_keys`) and writes
  `<data_dir>/<name>/<config>/<version>/tokenizer_<kind>_v<vocab_size>.json`; later calls load
  that file. A read-only data directory only costs the caching (a warning, then training each
  time); an unreadable cached file is replaced.
  """
  if kind not in tokenizer_lib.KINDS:
    raise UserError(f"unknown tokenizer kind '{kind}'; choose one of {', '.join(tokenizer_lib.KINDS)}.")
  if isinstance(builder_or_name, str):
    if data_dir is None:
      raise UserError(f"tokenizer_for_dataset('{builder_or_name}') needs the tfds data_dir.")
    builder = sources.open_source(builder_or_name, data_dir)
  else:
    builder = builder_or_name
  path = cache_path(builder, vocab_size, kind)
  if os.path.isfile(path):
    try:
      return tokenizer_lib.Tokenizer.load(path)
    except UserError as e:
      log.warning("retraining the tokenizer: cached %s is unusable (%s)", path, e)
  # Read everything before training: the Rust trainer pulling lazily from a tf.data iterator
  # crashes the process (segfault) on this stack.
  texts = list(dataset_texts(builder, split, text_keys))
  tok = tokenizer_lib.train_tokenizer(texts, vocab_size, kind)
  try:
    tok.save(path)
  except OSError as e:
    log.warning("cannot cache the tokenizer at %s (%s); it will be retrained next time", path, e)
  return tok


# -- the tokenizer of a run ----------------------------------------------------------------------
def for_run(cfg):
  """input.tokenizer if set; else the init_from run's (or HF folder's) tokenizer.json; else the dataset's own."""
  inp = cfg.input
  if inp.tokenizer:
    return tokenizer_lib.Tokenizer.load(inp.tokenizer)
  if cfg.init_from:
    src = cfg.init_from[3:] if cfg.init_from.startswith("hf:") else cfg.init_from.split(":")[0]  # hf:PATH
    path = os.path.join(os.path.expanduser(src), tokenizer_lib.TOKENIZER_FILE)
    if os.path.exists(path):
      return tokenizer_lib.Tokenizer.load(path)
  return tokenizer_for_dataset(inp.data, cfg.data_dir, inp.vocab_size)


def check_same(tok, directory: str, fix: str) -> None:
  """Refuses `tok` when DIRECTORY/tokenizer.json (the one a checkpoint there was trained with) differs."""
  path = os.path.join(os.path.abspath(os.path.expanduser(directory)), tokenizer_lib.TOKENIZER_FILE)
  if not os.path.exists(path):
    return
  saved = tokenizer_lib.Tokenizer.load(path)
  if saved.backend.get_vocab(with_added_tokens=True) != tok.backend.get_vocab(with_added_tokens=True):
    raise UserError(f"tokenizer {tok.source} (vocab {tok.vocab_size}) does not match {path} (vocab "
                    f"{saved.vocab_size}), the one the checkpoint in {os.path.dirname(path)} was trained "
                    f"with: token ids would mean other words. {fix}")
