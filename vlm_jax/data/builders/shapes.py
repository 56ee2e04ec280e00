"""The `shapes` tfds builder: an embedded dataset generated locally, offline.

Owns the tfds side only (features, configs, splits, `prepare`); the scenes,
pixels and language come from `shapes_scene`.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from vlm_jax.data.builders import prepared, shapes_build, shapes_scene

_DESCRIPTION = """\
Procedurally generated scenes of one large and 0-2 small coloured shapes
(circle, square, triangle, diamond; red, green, blue, yellow, purple, white)
on a noisy dark background. Each image comes with a class label (colour and
shape of the large object), a caption, 4 question/answer pairs, the objects
with their boxes, and a referring expression for each object (the shortest
description that fits it alone, e.g. "the small red circle") with its box.
Generated locally and deterministically: no download.
"""


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Image side in pixels and number of examples per split."""
  image_size: int = 64
  num_train: int = 20_000
  num_validation: int = 2_000
  num_test: int = 2_000


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Embedded generated dataset of coloured shapes (tfds name `shapes`).

  Example i of split s is drawn from `np.random.default_rng([SEED, s, i])`
  (s = 0 train, 1 validation, 2 test) and has key i, so every build gives
  byte-identical images and identical texts.

  Captions are a deterministic function of the scene (large object first, with
  its 3x3 grid position; small ones left to right with their relation to it).
  Caption duplicate rate of the `default` config (fraction of examples whose
  caption already occurred earlier in the split): train 9.5%, validation 1.6%,
  test 1.25%; the repeats are mostly one-object scenes (5% of examples, only
  216 possible captions). Each of the 24 label classes holds 3.7-4.4% of train.

  Generating `default` (24k examples at 64 px, tfrecord, ~205 MB) takes under
  a minute on 2 CPU cores: `prepare` builds it in a fresh process with one
  render process per core (see `shapes_build`); smaller configs render in
  the calling process. With
  file_format="array_record" read it through `tfds.data_source` /
  `builder.as_data_source()` (tfds cannot make a tf.data pipeline from
  array_record files).
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: image, label, caption, 4 QA pairs, objects.",
      "1.1.0": "Adds refs: one referring expression per object (expression, bbox, index into "
               "objects). Images, labels, captions, QA and objects are unchanged.",
  }
  BUILDER_CONFIGS = [
      ShapesConfig(name="default",
                   description="64x64 images, 20000/2000/2000 examples."),
      ShapesConfig(name="tiny", image_size=32, num_train=600,
                   num_validation=100, num_test=100,
                   description="32x32 images, 600/100/100 examples (tests)."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.ClassLabel(
                names=list(shapes_scene.LABEL_NAMES)),
            "caption": tfds.features.Text(),
            "qa": tfds.features.Sequence({
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
            }, length=4),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "shape": tfds.features.ClassLabel(
                    names=list(shapes_scene.SHAPES)),
                "color": tfds.features.ClassLabel(
                    names=list(shapes_scene.COLORS)),
                "size": tfds.features.ClassLabel(
                    names=list(shapes_scene.SIZES)),
            }),
            "refs": tfds.features.Sequence({
                "expression": tfds.features.Text(),
                "bbox": tfds.features.BBoxFeature(),
                "object": np.int32,  # index into objects
            }),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation,
             "test": cfg.num_test}
    return {split: self._generate_examples(shapes_scene.SPLIT_IDS[split], n)
            for split, n in sizes.items()}

  # Yields a split's rendered examples in index order; `shapes_build` hands in its workers'.
  render_examples = staticmethod(shapes_build.render_serially)

  def _generate_examples(self, split_id, num_examples):
    examples = self.render_examples(split_id, num_examples, self.builder_config.image_size)
    for i, ex in enumerate(examples):
      yield i, _encoded_example(ex)


def _encoded_example(ex):
  # tfds Sequence features take a dict of lists.
  ex["qa"] = {k: [p[k] for p in ex["qa"]] for k in ("question", "answer")}
  ex["objects"] = {k: [o[k] for o in ex["objects"]] for k in ("bbox", "shape", "color", "size")}
  ex["refs"] = {k: [r[k] for r in ex["refs"]] for k in ("expression", "bbox", "object")}
  return ex


def prepare(name: str, data_dir: str,
            file_format: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds `shapes` or `shapes/<config>` into data_dir unless already there.

  Never touches the network (no GCS lookup, nothing to download). file_format
  ("tfrecord", the default, or "array_record") only matters for the first
  build; array_record data is read with `tfds.data_source`, not `tfds.load`.
  """
  if name != "shapes" and not name.startswith("shapes/"):
    raise ValueError(f"prepare() builds the embedded 'shapes' dataset only, "
                     f"got {name!r}; use 'shapes' or 'shapes/<config>'.")

  def build(b, lock_fd):
    if shapes_build.worker_count(b.builder_config.num_train) >= 2:
      shapes_build.build_in_subprocess(name, data_dir, file_format, lock_fd)
    else:
      download(b, file_format)

  return prepared.prepare_once(lambda: builder(name, data_dir), build, f"dataset '{name}'",
                               data_dir)[0]


def builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  return tfds.builder(name, data_dir=data_dir, try_gcs=False)


def download(b: tfds.core.DatasetBuilder, file_format=None, render=None) -> None:
  """Generates and writes b's dataset in this process (rendering with `render` if given)."""
  if render is not None:
    b.render_examples = render
  b.download_and_prepare(
      file_format=file_format,
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
