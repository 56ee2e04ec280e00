"""Input pipeline: deterministic per (seed, step), resumable mid-epoch, disjoint hosts, padded eval,
the feature specs' fields (objects, referring expressions)."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlm_jax.data import features, pipeline, sources, tokenizer
from vlm_jax.errors import UserError


def _take(it, n):
  return list(itertools.islice(it, n))


def test_train_batches_deterministic_and_normalised(tiny_config):
  inp = tiny_config.input
  a = _take(pipeline.train_batches(inp, tiny_config.data_dir, 3, 16), 3)
  b = _take(pipeline.train_batches(inp, tiny_config.data_dir, 3, 16), 3)
  c = _take(pipeline.train_batches(inp, tiny_config.data_dir, 4, 16), 1)
  assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].shape == (16,) and a[0]["label"].dtype == np.int32
  assert -1.0 <= a[0]["image"].min() and a[0]["image"].max() <= 1.0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_resume_mid_epoch_and_across_epochs_matches_uninterrupted(tiny_config):
  inp = tiny_config.input  # tiny train split: 600 examples -> 37.5 batches of 16 per epoch
  full = _take(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16), 45)
  for start in (7, 37, 40):
    resumed = _take(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16, start_step=start), 3)
    for k, batch in enumerate(resumed):
      np.testing.assert_array_equal(batch["image"], full[start + k]["image"])
      np.testing.assert_array_equal(batch["label"], full[start + k]["label"])


def test_cached_decoded_images_give_the_same_batches_and_resume(tiny_config):
  inp = tiny_config.input.copy_and_resolve_references()
  plain = _take(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16), 45)  # 1.2 epochs
  inp.cache_decoded = True
  cached = _take(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16), 45)
  resumed = _take(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16, start_step=40), 3)
  for x, y in zip(plain + plain[40:43], cached + resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_epochs_are_reshuffled(tiny_config):
  full = _take(pipeline.train_batches(tiny_config.input, tiny_config.data_dir, 0, 100), 12)
  assert not np.array_equal(full[0]["label"], full[6]["label"])  # epoch 0 vs epoch 1 start


def test_hosts_read_disjoint_examples(tiny_config):
  inp = tiny_config.input
  seen = []
  for i in range(2):
    _, it = pipeline.eval_batches(inp, tiny_config.data_dir, "test", 64, sources.Host(i, 2))
    seen.append(np.concatenate([b["image"][b["_mask"] == 1].reshape(-1, 32 * 32 * 3) for b in it]))
  assert len(seen[0]) + len(seen[1]) == 100
  flat = {x.tobytes() for x in seen[0]}
  assert not any(x.tobytes() in flat for x in seen[1])


def test_eval_pads_to_whole_batches_with_mask(tiny_config):
  n, it = pipeline.eval_batches(tiny_config.input, tiny_config.data_dir, "validation", 64)
  batches = list(it)
  assert n == len(batches) == 2
  assert all(b["image"].shape[0] == 64 for b in batches)
  assert sum(int(b["_mask"].sum()) for b in batches) == 100


def test_unprepared_catalog_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match=r"not prepared in data_dir .*tfds build cifar10"):
    sources.open_source("cifar10", str(tmp_path))


def test_unknown_dataset_and_split_are_clear_errors(tiny_config):
  with pytest.raises(UserError, match="not a tensorflow-datasets name"):
    sources.open_source("no_such_dataset_xyz", tiny_config.data_dir)
  inp = tiny_config.input
  inp.unlock()
  inp.train_split = "tain"
  with pytest.raises(UserError, match="split 'tain'"):
    next(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16))


def _raw_examples(tiny_config, split):
  """The split's examples as tfds stores them (in order), objects and refs as numpy."""
  builder = sources.open_source(tiny_config.input.data, tiny_config.data_dir)
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


OBJECTS = features.Objects("objects/bbox", "objects/shape", max_objects=2)
REFS = features.Refs("refs/expression", "refs/bbox")


def test_eval_objects_are_padded_in_order_and_refs_one_row_each(tiny_config):
  """Objects: the first 2 of each example's objects, zero-padded, with their count; Refs explode
  the split into one row per referring expression, each row keeping its example's objects."""
  raw = _raw_examples(tiny_config, "validation")
  n, it = pipeline.eval_batches(tiny_config.input, tiny_config.data_dir, "validation", 64,
                                features=(OBJECTS, REFS))
  rows = [{k: v[i] for k, v in b.items()} for b in it for i in range(len(b["_mask"])) if b["_mask"][i]]
  want = [(ex, j) for ex in raw for j in range(len(ex["refs"]["expression"]))]
  assert len(rows) == len(want) > len(raw) and n == -(-len(want) // 64)
  counts = set()
  for row, (ex, j) in zip(rows, want):
    boxes, labels = ex["objects"]["bbox"], ex["objects"]["shape"]
    k = min(len(labels), 2)
    counts.add(int(row["objects_count"]))
    assert row["objects_count"] == k and row["objects_boxes"].shape == (2, 4)
    np.testing.assert_array_equal(row["objects_boxes"][:k], boxes[:k])
    np.testing.assert_array_equal(row["objects_labels"][:k], labels[:k])
    assert not row["objects_boxes"][k:].any() and not row["objects_labels"][k:].any()
    assert tokenizer.texts({"ref": row["ref"][None]}, "ref")[0] == ex["refs"]["expression"][j].decode()
    np.testing.assert_array_equal(row["ref_box"], ex["refs"]["bbox"][j])
  assert counts == {1, 2}  # one-object scenes padded, three-object scenes cut to 2


def test_train_objects_are_shuffled_per_example_and_refs_drawn_from_it(tiny_config):
  """Training: each row's objects are its example's, in an order drawn with the example's seed
  (the same on every pass); its one referring expression is one of the example's, with its box."""
  raw = _raw_examples(tiny_config, "train")
  by_count = {}
  for ex in raw:
    by_count.setdefault(len(ex["objects"]["shape"]), []).append(ex)
  inp = tiny_config.input
  feats = (features.Objects("objects/bbox", "objects/shape", max_objects=3), REFS)
  a = _take(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16, features=feats), 3)
  b = _take(pipeline.train_batches(inp, tiny_config.data_dir, 0, 16, features=feats), 3)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  reordered = 0
  for batch in a:
    refs = tokenizer.texts(batch, "ref")
    for i in range(16):
      k = int(batch["objects_count"][i])
      got = [(tuple(box), int(lab)) for box, lab in zip(batch["objects_boxes"][i][:k], batch["objects_labels"][i][:k])]
      # the example whose objects these are: same objects as a set
      match = [ex for ex in by_count[k] if sorted(got) == sorted(
          (tuple(box), int(lab)) for box, lab in zip(ex["objects"]["bbox"], ex["objects"]["shape"]))]
      assert match, got
      ex = match[0]
      reordered += got != [(tuple(box), int(lab)) for box, lab in zip(ex["objects"]["bbox"], ex["objects"]["shape"])]
      j = [e.decode() for e in ex["refs"]["expression"]].index(refs[i])
      np.testing.assert_array_equal(batch["ref_box"][i], ex["refs"]["bbox"][j])
  assert reordered > 0
