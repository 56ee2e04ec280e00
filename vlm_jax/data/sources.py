"""Where examples come from: tfds builders by name, the embedded `shapes` dataset built on demand.

`open_source(name, data_dir)` returns a prepared `tfds.core.DatasetBuilder` or raises UserError
saying how to prepare it. Embedded datasets (generated locally, no network) are built on first
use at their current version; an earlier version named as `shapes/tiny:1.0.0` is read where it
is prepared (tfds cannot build it again); a user's folder (`folder:/path`, see builders/folder.py) is prepared into data_dir on first
use and again when it changes; catalog datasets (cifar10, imagenet2012, coco_captions, ...) must
already be prepared in `data_dir`, because these machines may have no network.
`Host` says which share of every split a process reads.

tensorflow-datasets is imported where a builder is opened, so that the model, the tasks and the
train step build without TensorFlow (e.g. `tools/benchmark.py` on a GPU image that lacks it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Optional

from vlm_jax.errors import UserError

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

EMBEDDED = ("shapes",)
FOLDER_PREFIX = "folder:"
_folders = {}  # (folder, data_dir) -> builder: a process keeps the folder dataset it first opened


@dataclasses.dataclass
class Host:
  """This process's index among `count` processes: it reads split share `index` of `count`."""
  index: int = 0
  count: int = 1


@dataclasses.dataclass
class DataInfo:
  name: str
  num_classes: int  # 0 when there is no ClassLabel under the label key
  class_names: Optional[list]
  splits: dict  # split name -> number of examples
  features: tuple  # top-level feature names
  # Names of every ClassLabel feature by its path ("objects/shape" inside a Sequence included): the
  # words of detection targets. Older data_info.json files lack it.
  label_names: dict = dataclasses.field(default_factory=dict)


def _is_embedded(name: str) -> bool:
  return name.split("/")[0].split(":")[0] in EMBEDDED


def open_source(name: str, data_dir: str, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder for `name` in `data_dir` (building embedded datasets if `prepare`)."""
  import tensorflow_datasets as tfds  # TensorFlow only where data is opened: DataInfo loads without it

  data_dir = os.path.expanduser(data_dir)
  if name.startswith(FOLDER_PREFIX):
    return _open_folder(name[len(FOLDER_PREFIX):], data_dir)
  if _is_embedded(name):
    from vlm_jax.data.builders import shapes  # registers the builder; imports TensorFlow
    base, _, version = name.partition(":")
    if version and version != str(shapes.Shapes.VERSION):
      return _open_earlier_version(base, version, str(shapes.Shapes.VERSION), data_dir)
    if prepare:
      try:
        return shapes.prepare(name, data_dir)
      except PermissionError as e:
        raise UserError(f"cannot build dataset '{name}' into data_dir '{data_dir}': {e}. "
                        f"Choose a writable --config.data_dir.") from None
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"dataset '{name}' is not a tensorflow-datasets name nor an embedded dataset "
                    f"({', '.join(EMBEDDED)}). Check --config.input.data.") from None
  except ValueError as e:  # e.g. an unknown builder config name
    raise UserError(f"dataset '{name}': {e}. Check --config.input.data.") from None
  if not builder.is_prepared():
    raise UserError(
        f"dataset '{name}' is not prepared in data_dir '{data_dir}' and cannot be downloaded here. "
        f"Prepare it where there is network access with `tfds build {name} --data_dir=DIR` (datasets "
        f"with manual downloads such as imagenet2012 need their archives in DIR/downloads/manual), then "
        f"copy DIR here and pass --config.data_dir=DIR.")
  return builder


def _open_earlier_version(base: str, version: str, current: str,
                          data_dir: str) -> tfds.core.DatasetBuilder:
  import tensorflow_datasets as tfds

  try:  # a named version is read from its prepared files, without the builder's code
    return tfds.builder(f"{base}:{version}", data_dir=data_dir, try_gcs=False)
  except (AssertionError, ValueError):  # tfds: not prepared, and the code builds another version
    raise UserError(
        f"dataset '{base}:{version}' is not prepared in data_dir '{data_dir}', and only its current "
        f"version {current} can be built (the builder's release notes, in vlm_jax/data/builders/, "
        f"say what changed): use --config.input.data={base}, or point --config.data_dir to the "
        f"data_dir that holds version {version}.") from None


def _open_folder(path: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if not path.strip():
    raise UserError(f"input.data='{FOLDER_PREFIX}' names no folder; "
                    f"write --config.input.data=folder:/path/to/images.")
  key = (os.path.realpath(os.path.expanduser(path)), os.path.realpath(data_dir))
  if key not in _folders:
    from vlm_jax.data.builders import folder  # imports TensorFlow
    _folders[key] = folder.prepare(path, data_dir)
  return _folders[key]


def data_info(builder: tfds.core.DatasetBuilder, label_key: str = "label", needed_splits=()) -> DataInfo:
  """What the tasks need to know about a dataset; `needed_splits` must exist (checked before training)."""
  import tensorflow_datasets as tfds  # TensorFlow only where data is opened

  for split in filter(None, (s.strip() for s in needed_splits)):
    num_examples(builder, split)
  feats = builder.info.features
  label = feats[label_key] if label_key in feats else None
  num_classes, names = 0, None
  if isinstance(label, tfds.features.ClassLabel):
    num_classes, names = label.num_classes, list(label.names)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  return DataInfo(builder.info.full_name, num_classes, names, splits, tuple(feats.keys()),
                  _label_names(feats))


def _label_names(feats, prefix: str = "") -> dict:
  """{path: names} of the ClassLabel features under a FeaturesDict, through Sequence features."""
  import tensorflow_datasets as tfds  # TensorFlow only where data is opened

  out = {}
  for key, f in feats.items():
    while isinstance(f, tfds.features.Sequence):
      f = f.feature
    if isinstance(f, tfds.features.ClassLabel):
      out[prefix + key] = list(f.names)
    elif isinstance(f, tfds.features.FeaturesDict):
      out.update(_label_names(f, f"{prefix}{key}/"))
  return out


def num_examples(builder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise UserError(f"split '{split}' of dataset '{builder.info.full_name}' does not exist ({e}). "
                    f"Available splits: {', '.join(builder.info.splits.keys())}; choose among them with "
                    f"--config.input.train_split / --config.evals.splits.") from None
