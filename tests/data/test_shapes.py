"""Tests of the embedded `shapes` dataset: scene generator and tfds builder."""

import collections
import hashlib
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

import vlm_jax.data.builders  # noqa: F401  (registers `shapes`)
from vlm_jax.data import sources, tokenizer_source
from vlm_jax.data.builders import shapes
from vlm_jax.data.builders import shapes_scene as S
from vlm_jax.errors import UserError

TINY_SPLITS = {"train": 600, "validation": 100, "test": 100}
# Measured on the default config's train split: 9.5% (see Shapes docstring).
MAX_TRAIN_DUPLICATE_RATE = 0.11
# sha256 of images, labels, captions, QA and objects of tiny's first 100 validation examples, as
# version 1.0.0 generated them (see `_content_digest`): later versions add features only.
DIGEST_1_0_0 = "39ae2adeffd2606a859ba419a2681c28c9d6a18d9cf7309b65916725a3530a0a"
_REF_RE = re.compile(rf"the (?:({'|'.join(S.SIZES)}) )?(?:({'|'.join(S.COLORS)}) )?"
                     rf"({'|'.join(S.SHAPES)})(?: on the ({'|'.join(S.REF_SIDES)}))?")


def _text(x):
  return x.decode() if isinstance(x, bytes) else x


def _records(ds):
  return list(tfds.as_numpy(ds))


def _fingerprint(ex):
  """Order-independent identity of one decoded example."""
  qa = tuple(zip(map(_text, ex["qa"]["question"]),
                 map(_text, ex["qa"]["answer"])))
  return (hashlib.sha1(np.ascontiguousarray(ex["image"]).tobytes()).hexdigest(),
          int(ex["label"]), _text(ex["caption"]), qa,
          tuple(int(v) for v in ex["objects"]["shape"]))


def _obj(bbox):
  """An Obj with the geometry of a stored [ymin, xmin, ymax, xmax] box."""
  ymin, xmin, ymax, xmax = (float(v) for v in bbox)
  return S.Obj(0, 0, False, (xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  """shapes/tiny built twice: tfrecord in one dir, in this process; array_record in another,
  rendered by worker processes as the default config is."""
  d_rec = str(tmp_path_factory.mktemp("tfrecord"))
  d_ar = str(tmp_path_factory.mktemp("array_record"))
  shapes.prepare("shapes/tiny", d_rec)
  saved = dict(os.environ)
  os.environ.update(VLM_JAX_SHAPES_WORKERS="2", VLM_JAX_SHAPES_EXAMPLES_PER_WORKER="40")
  try:
    shapes.prepare("shapes/tiny", d_ar, file_format="array_record")
  finally:
    os.environ.clear()
    os.environ.update(saved)
  return d_rec, d_ar


@pytest.fixture(scope="module")
def tiny_train(tiny_dirs):
  return _records(tfds.load("shapes/tiny", data_dir=tiny_dirs[0],
                            split="train"))


def test_examples_are_a_function_of_split_and_index():
  for i in range(4):
    a, b = S.make_example(1, i, 32), S.make_example(1, i, 32)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert (a["caption"], a["qa"], a["label"]) == (
        b["caption"], b["qa"], b["label"])
  a, b = S.make_example(0, 7, 32), S.make_example(2, 7, 32)
  assert not np.array_equal(a["image"], b["image"])
  # Another image size changes the pixels only.
  big = S.make_example(0, 7, 64)
  assert big["image"].shape == (64, 64, 3)
  assert (big["caption"], big["qa"], big["label"]) == (
      a["caption"], a["qa"], a["label"])


def test_tfds_load_tiny_shapes_and_splits(tiny_dirs):
  builder = tfds.builder("shapes/tiny", data_dir=tiny_dirs[0])
  assert builder.info.version == "1.1.0"
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == (
      TINY_SPLITS)
  ds = tfds.load("shapes/tiny", data_dir=tiny_dirs[0], split="validation")
  ex = next(iter(tfds.as_numpy(ds)))
  assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
  assert ex["label"].dtype == np.int64
  assert isinstance(ex["caption"], bytes)
  assert ex["qa"]["question"].shape == (4,) and ex["qa"]["answer"].shape == (4,)
  n = ex["objects"]["shape"].shape[0]
  # The generator's own scene of this example: its object count, not a range.
  made = (S.make_example(S.SPLIT_IDS["validation"], i, 32) for i in range(TINY_SPLITS["validation"]))
  fresh = next(f for f in made if np.array_equal(f["image"], ex["image"]))
  assert n == len(fresh["objects"]) and ex["objects"]["bbox"].shape == (n, 4)
  assert builder.info.features["label"].num_classes == 24
  refs = ex["refs"]
  assert refs["expression"].shape == (n,) and refs["bbox"].shape == (n, 4)
  assert refs["object"].dtype == np.int32 and sorted(refs["object"]) == list(range(n))
  assert all(_text(e).startswith("the ") for e in refs["expression"])
  assert builder.info.features["label"].names[0] == "red circle"


def test_builds_identical_across_dirs_and_formats(tiny_dirs):
  d_rec, d_ar = tiny_dirs
  from_rec = _records(tfds.load("shapes/tiny", data_dir=d_rec,
                                split="validation"))
  source = tfds.data_source("shapes/tiny", data_dir=d_ar, split="validation")
  from_ar = [source[i] for i in range(len(source))]
  fresh = []
  for i in range(TINY_SPLITS["validation"]):
    ex = S.make_example(S.SPLIT_IDS["validation"], i, 32)
    ex["qa"] = {k: [p[k] for p in ex["qa"]] for k in ("question", "answer")}
    ex["objects"] = {"shape": [o["shape"] for o in ex["objects"]]}
    fresh.append(ex)
  rec, ar, gen = (sorted(map(_fingerprint, x))
                  for x in (from_rec, from_ar, fresh))
  assert rec == ar == gen


def test_prepare_is_idempotent(tiny_dirs):
  builder = shapes.prepare("shapes/tiny", tiny_dirs[0])
  files = sorted(builder.data_path.iterdir())
  stamps = [f.stat().mtime for f in files]
  builder = shapes.prepare("shapes/tiny", tiny_dirs[0])
  assert [f.stat().mtime for f in sorted(builder.data_path.iterdir())] == (
      stamps)
  with pytest.raises(ValueError, match="shapes"):
    shapes.prepare("mnist", tiny_dirs[0])


def test_labels_match_large_object(tiny_train):
  names = S.LABEL_NAMES
  for ex in tiny_train:
    objs = ex["objects"]
    assert list(objs["size"]).count(1) == 1 and objs["size"][0] == 1
    assert ex["label"] == objs["color"][0] * len(S.SHAPES) + objs["shape"][0]
    assert names[ex["label"]] == (
        f"{S.COLORS[objs['color'][0]]} {S.SHAPES[objs['shape'][0]]}")
    side = objs["bbox"][:, 2] - objs["bbox"][:, 0]
    assert side[0] >= 0.39 and all(side[1:] <= 0.26)


def test_captions_mention_large_object_first(tiny_train):
  for ex in tiny_train:
    objs = ex["objects"]
    color, shape = S.COLORS[objs["color"][0]], S.SHAPES[objs["shape"][0]]
    caption = _text(ex["caption"])
    assert re.match(rf"a (large|big) {color} {shape} ", caption), caption
    assert caption.count(" small ") == len(objs["shape"]) - 1


def test_qa_answers_consistent_with_objects(tiny_train):
  for ex in tiny_train:
    objs = ex["objects"]
    names = [f"{S.COLORS[c]} {S.SHAPES[s]}"
             for c, s in zip(objs["color"], objs["shape"])]
    n = len(names)
    for q, a in zip(map(_text, ex["qa"]["question"]),
                    map(_text, ex["qa"]["answer"])):
      if q == "how many objects are there?":
        assert a == S.NUMBER_WORDS[n]
      elif q == "how many small objects are there?":
        assert a == S.NUMBER_WORDS[n - 1]
      elif m := re.fullmatch(r"how many (\w+)s are there\?", q):
        count = sum(S.SHAPES[s] == m[1] for s in objs["shape"])
        assert a == S.NUMBER_WORDS[count]
      elif q == "what color is the large shape?":
        assert a == S.COLORS[objs["color"][0]]
      elif m := re.fullmatch(r"what color is the (\w+)\?", q):
        idx = [i for i in range(n) if S.SHAPES[objs["shape"][i]] == m[1]]
        assert len(idx) == 1 and a == S.COLORS[objs["color"][idx[0]]]
      elif q == "what shape is the large object?":
        assert a == S.SHAPES[objs["shape"][0]]
      elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        idx = [i for i in range(n) if S.COLORS[objs["color"][i]] == m[1]]
        assert len(idx) == 1 and a == S.SHAPES[objs["shape"][idx[0]]]
      elif q == "where is the large shape?":
        assert a == S.POSITIONS[S.grid_cell(_obj(objs["bbox"][0]))]
      elif m := re.fullmatch(r"where is the small (\w+ \w+) relative to the "
                             r"large shape\?", q):
        idx = [i for i in range(1, n) if names[i] == m[1]]
        assert len(idx) == 1
        rel = S.relation(_obj(objs["bbox"][idx[0]]), _obj(objs["bbox"][0]))
        assert a == S.RELATIONS[rel]
      elif m := re.fullmatch(r"is there a (\w+ \w+)\?", q):
        assert a == ("yes" if m[1] in names else "no")
      else:
        pytest.fail(f"unexpected question {q!r}")


def test_qa_types_and_yes_no_balance(tiny_train):
  kinds, yes_no = collections.Counter(), collections.Counter()
  for ex in tiny_train:
    questions = [_text(q) for q in ex["qa"]["question"]]
    kinds.update({q.split()[0] + " " + q.split()[1] for q in questions})
    yes_no.update(_text(a) for q, a in zip(questions, ex["qa"]["answer"])
                  if q.startswith("is there"))
  for kind in ("what color", "what shape", "how many", "where is",
               "is there"):
    assert kinds[kind] >= 0.6 * len(tiny_train), kinds
  assert 0.4 <= yes_no["yes"] / sum(yes_no.values()) <= 0.6, yes_no


def test_default_train_caption_duplicates_and_class_coverage():
  cfg = shapes.Shapes.BUILDER_CONFIGS[0]
  assert (cfg.name, cfg.image_size, cfg.num_train) == ("default", 64, 20_000)
  seen, dups, labels = set(), 0, collections.Counter()
  for i in range(cfg.num_train):
    scene = S.sample_scene(S.example_rng(S.SPLIT_IDS["train"], i))
    caption = S.caption(scene)
    dups += caption in seen
    seen.add(caption)
    labels[S.label_of(scene)] += 1
  assert dups / cfg.num_train < MAX_TRAIN_DUPLICATE_RATE
  assert sorted(labels) == list(range(24))
  assert min(labels.values()) > 0.03 * cfg.num_train


def test_user_config(tmp_path):
  cfg = shapes.ShapesConfig(name="mini", image_size=24, num_train=8,
                            num_validation=2, num_test=2)
  builder = tfds.builder("shapes", config=cfg, data_dir=str(tmp_path))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="test"))))
  assert ex["image"].shape == (24, 24, 3)
  assert builder.info.splits["train"].num_examples == 8


def _fits(attrs, size, color, shape):
  """Indices of the objects (size, color, shape) that a description's words fit."""
  return [i for i, (sz, c, sh) in enumerate(attrs)
          if sh == shape and size in (None, sz) and color in (None, c)]


def test_refs_pick_out_exactly_one_object(tiny_train):
  sides = total = 0
  for ex in tiny_train:
    objs, refs = ex["objects"], ex["refs"]
    attrs = [(S.SIZES[sz], S.COLORS[c], S.SHAPES[sh])
             for sz, c, sh in zip(objs["size"], objs["color"], objs["shape"])]
    centre_x = (objs["bbox"][:, 1] + objs["bbox"][:, 3]) / 2
    # Every object of this generator has an expression, in object order.
    assert list(refs["object"]) == list(range(len(attrs)))
    for text, box, obj in zip(map(_text, refs["expression"]), refs["bbox"], refs["object"]):
      total += 1
      np.testing.assert_array_equal(box, objs["bbox"][obj])
      m = _REF_RE.fullmatch(text)
      assert m, text
      size, color, shape, side = m.groups()
      fit = _fits(attrs, size, color, shape)
      if side is None:
        assert fit == [obj], (text, attrs)
        # Shortest: without its size or colour word it would fit another object too; and a size
        # word is used only where the colour word alone does not single the object out.
        if size:
          assert len(_fits(attrs, None, color, shape)) > 1, (text, attrs)
          assert color or len(_fits(attrs, None, attrs[obj][1], shape)) > 1, (text, attrs)
        if color:
          assert len(_fits(attrs, size, None, shape)) > 1, (text, attrs)
      else:
        sides += 1
        # Only for an object that no attribute description singles out; of the two objects
        # the words fit, the one on that side.
        assert attrs.count(attrs[obj]) > 1, (text, attrs)
        assert len(fit) == 2 and obj in fit, (text, attrs)
        left, right = sorted(fit, key=lambda i: centre_x[i])
        assert obj == (left if side == "left" else right), (text, attrs)
        assert centre_x[right] - centre_x[left] >= 0.08
  assert sides > 0 and total > 1000  # both kinds occur in tiny's train split


def _content_digest(examples):
  """sha256 of what version 1.0.0 holds, from examples as `make_example` or tfds return them."""
  h = hashlib.sha256()
  for ex in examples:
    h.update(np.ascontiguousarray(ex["image"]).tobytes())
    h.update(repr((int(ex["label"]), ex["caption"], ex["qa"])).encode())
    for o in ex["objects"]:
      h.update(np.asarray(o["bbox"], np.float64).tobytes())
      h.update(repr((int(o["shape"]), int(o["color"]), int(o["size"]))).encode())
  return h.hexdigest()


def test_referring_expressions_leave_1_0_0_examples_unchanged():
  examples = [S.make_example(S.SPLIT_IDS["validation"], i, 32) for i in range(100)]
  assert _content_digest(examples) == DIGEST_1_0_0


class _ShapesAt100(shapes.Shapes, skip_registration=True):
  """`shapes` as version 1.0.0 wrote it: the same examples (DIGEST_1_0_0) without refs."""
  name = "shapes"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = super()._info().features
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({k: v for k, v in features.items() if k != "refs"}),
        supervised_keys=("image", "label"))

  def _generate_examples(self, split_id, num_examples):
    for key, ex in super()._generate_examples(split_id, num_examples):
      del ex["refs"]
      yield key, ex


@pytest.fixture(scope="module")
def old_dir(tmp_path_factory):
  """A data_dir holding shapes/tiny at version 1.0.0, the one before refs."""
  d = str(tmp_path_factory.mktemp("v1_0_0"))
  _ShapesAt100(config="tiny", data_dir=d).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return d


def test_old_data_dir_keeps_working(old_dir):
  old_files = sorted((p, p.stat().mtime) for p in tfds.builder(
      "shapes/tiny:1.0.0", data_dir=old_dir).data_path.iterdir())
  # A run that names the version reads the prepared 1.0.0 files.
  old = sources.open_source("shapes/tiny:1.0.0", old_dir)
  assert old.info.version == "1.0.0" and "refs" not in old.info.features
  assert sources.data_info(old, needed_splits=["train", "test"]).splits == TINY_SPLITS
  # A run that names no version (as config.json records it) gets 1.1.0, built alongside: the
  # same examples, plus refs.
  new = sources.open_source("shapes/tiny", old_dir)
  assert new.info.version == "1.1.0" and new.data_dir != old.data_dir
  assert set(new.info.features) - set(old.info.features) == {"refs"}
  assert sorted((p, p.stat().mtime) for p in old.data_path.iterdir()) == old_files
  for split in TINY_SPLITS:
    assert (sorted(map(_fingerprint, _records(old.as_dataset(split=split))))
            == sorted(map(_fingerprint, _records(new.as_dataset(split=split)))))
  # Same texts, so the same tokenizer: a run resumed on the new version passes the tokenizer check.
  tok_old = tokenizer_source.tokenizer_for_dataset(old, vocab_size=300)
  tok_new = tokenizer_source.tokenizer_for_dataset(new, vocab_size=300)
  assert tok_old.to_json() == tok_new.to_json()


def test_earlier_version_that_is_not_prepared_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match=r"'shapes/tiny:1\.0\.0' is not prepared.*input\.data=shapes/tiny"):
    sources.open_source("shapes/tiny:1.0.0", str(tmp_path))
  assert not any(tmp_path.iterdir())  # nothing written
