"""Detection and grounding on the task interface: targets are the true boxes as location tokens,
the evaluation chain scores perfect predictions 1.0, a tiny run trains through the trainer, and
predict prints boxes in pixels of the original image."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax import config, predict, train
from vlm_jax.data import loc_tokens, pipeline, tokenizer as tokenizer_lib
from vlm_jax.data.builders import shapes_scene
from vlm_jax.errors import UserError
from vlm_jax.runtime import build

from conftest import REPO


def _task(recipe, data_dir, **overrides):
  cfg = config.load(os.path.join(REPO, f"configs/{recipe}.py:tiny"))
  cfg.data_dir = data_dir
  for k, v in overrides.items():
    node = cfg
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return cfg, build(cfg, devices=jax.devices()[:1]).task


def _answer_ids(task, tokens, loss_mask):
  """The answer tokens (and EOS) of one training row."""
  return [int(t) for t, m in zip(tokens[1:], loss_mask) if m]


def test_detection_targets_are_every_object_in_a_random_order(data_dir):
  cfg, task = _task("detection_shapes", data_dir)
  assert task.names == list(shapes_scene.SHAPES)  # the ClassLabel names of objects/shape
  it = pipeline.train_batches(cfg.input, data_dir, 0, 16, features=task.features(cfg.input),
                              encode=lambda b, train, stats: b)
  raw = next(it)
  enc = task.encode({k: np.copy(v) for k, v in raw.items()}, True, pipeline.TextStats())
  orders = set()
  for i in range(16):
    ids = _answer_ids(task, enc["tokens"][i], enc["loss_mask"][i])
    assert ids[-1] == task.tokenizer.eos_id
    parsed = loc_tokens.parse_objects(ids, task.tokenizer)
    n = int(raw["objects_count"][i])
    assert parsed.broken == 0 and len(parsed.boxes) == n >= 1
    np.testing.assert_allclose(parsed.boxes, raw["objects_boxes"][i][:n], atol=0.5 / 1023 + 1e-6)
    assert parsed.labels == [task.names[j] for j in raw["objects_labels"][i][:n]]
    orders.add(tuple(parsed.labels))
  # The same example in another epoch/seed gets another order (Pix2Seq): the spec draws per seed.
  it2 = pipeline.train_batches(cfg.input, data_dir, 1, 16, features=task.features(cfg.input),
                               encode=lambda b, train, stats: b)
  assert any(not np.array_equal(a, b) for a, b in zip(raw["objects_boxes"], next(it2)["objects_boxes"]))


def _perfect_preds(task, batch, length):
  """Generated tokens equal to each row's target answer (EOS included), log-probs 0."""
  rows = []
  for t, m in zip(batch["tokens"], batch["loss_mask"]):
    ids = _answer_ids(task, t, m)
    rows.append(ids + [task.tokenizer.pad_id] * (length - len(ids)))
  tokens = np.array(rows, np.int32)
  return {"tokens": tokens, "logp": np.zeros(tokens.shape, np.float32)}


def test_perfect_detections_score_map_one_and_misplaced_ones_zero(data_dir):
  cfg, task = _task("detection_shapes", data_dir)
  _, batches = pipeline.eval_batches(cfg.input, data_dir, "test", 32, features=task.features(cfg.input),
                                     encode=task.encode)
  batch = next(batches)
  preds = _perfect_preds(task, batch, cfg.evals.decode_len)
  records = task.collect(batch, preds)
  assert len(records) == int(batch["_mask"].sum())
  sums = {"loss": 1.0, "tokens": 1.0}
  out = task.summarize(sums, records)
  assert out["map"] == pytest.approx(1.0) and out["map50"] == pytest.approx(1.0)
  # Every predicted box moved by half its size: IoU 1/3 < 0.5, nothing matches.
  shifted = [([(b + np.array([0, 0.5, 0, 0.5]) * (b[3] - b[1]), lab, s) for b, lab, s in p], t) for p, t in records]
  assert task.summarize(sums, shifted)["map50"] == pytest.approx(0.0)
  # Pictures draw boxes; format prints pixel boxes of the original size.
  rows = json.loads(task.format(preds, [(200, 100)] * len(preds["tokens"]))[0])
  true = batch["objects_boxes"][0][0] * np.array([200, 100, 200, 100])
  np.testing.assert_allclose(rows[0]["box"], true, atol=0.6)
  assert rows[0]["label"] == task.names[batch["objects_labels"][0][0]] and rows[0]["score"] == 1.0
  items = task.draw(batch, preds)
  assert all(ok for _, _, ok in items[:4]) and not np.array_equal(items[0][0], batch["image"][0])


def test_perfect_groundings_score_one(data_dir):
  cfg, task = _task("grounding_shapes", data_dir)
  _, batches = pipeline.eval_batches(cfg.input, data_dir, "test", 32, features=task.features(cfg.input),
                                     encode=task.encode)
  batch = next(batches)
  assert all(t for t in tokenizer_lib.texts(batch, "ref"))  # one row per expression
  preds = _perfect_preds(task, batch, cfg.evals.decode_len)
  records = task.collect(batch, preds)
  out = task.summarize({"loss": 1.0, "tokens": 1.0}, records)
  assert out["grounding_acc50"] == pytest.approx(1.0)
  flipped = [(None if i % 2 else p, t) for i, (p, t) in enumerate(records)]
  assert task.summarize({"loss": 1.0, "tokens": 1.0}, flipped)["grounding_acc50"] == pytest.approx(
      sum(1 for i in range(len(records)) if i % 2 == 0) / len(records))


def test_missing_config_keys_and_unknown_labels_are_one_error(data_dir):
  with pytest.raises(UserError, match="input.object_label_key"):
    _task("detection_shapes", data_dir, **{"input.object_label_key": "objects/nothing"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  out = {}
  for task_name in ("detection", "grounding"):
    cfg = config.load(os.path.join(REPO, f"configs/{task_name}_shapes.py:tiny"))
    cfg.data_dir = data_dir
    cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 4, 4, 4
    cfg.evals.splits, cfg.evals.pictures = "test", 2
    workdir = str(tmp_path_factory.mktemp(task_name))
    out[task_name] = (workdir, train.train(cfg, workdir))
  return out


def test_tiny_runs_report_their_metrics_and_draw_boxes(runs):
  for task_name, key in (("detection", "test/map50"), ("grounding", "test/grounding_acc50")):
    workdir, metrics = runs[task_name]
    assert 0.0 <= metrics[key] <= 1.0 and np.isfinite(metrics["test/loss"])
    assert os.path.exists(os.path.join(workdir, "pictures", "test_0000004.png"))


def test_predict_prints_pixel_boxes_and_refer_is_the_grounding_option(runs, tmp_path):
  path = str(tmp_path / "wide.png")
  Image.fromarray(np.full((40, 120, 3), 128, np.uint8)).save(path)
  det, gr = runs["detection"][0], runs["grounding"][0]
  (_, text, err), = predict.predict(det, [path])
  assert err is None and isinstance(json.loads(text), list)
  for obj in json.loads(text):
    y1, x1, y2, x2 = obj["box"]
    assert 0 <= y1 < y2 <= 40 and 0 <= x1 < x2 <= 120 and 0 < obj["score"] <= 1
  (_, text, err), = predict.predict(gr, [path], {"refer": "the small red circle"})
  assert err is None and len(json.loads(text)) <= 1
  with pytest.raises(UserError, match="--refer"):
    predict.predict(gr, [path])
  with pytest.raises(UserError, match="--question is not an option .* Use --refer instead"):
    predict.predict(gr, [path], {"question": "what is it?"})
  with pytest.raises(UserError, match="--refer is not an option .* takes images only"):
    predict.predict(det, [path], {"refer": "x"})


def test_loc_sigma_makes_a_near_miss_cheaper_than_a_far_one_in_training_only(data_dir):
  cfg, task = _task("grounding_shapes", data_dir, **{"model.loc_sigma": 16.0})
  v, target_bin = task.tokenizer.vocab_size, 500
  targets = np.array([[task.loc_ids[target_bin], task.tokenizer.eos_id]], np.int32)

  def loss(peak_bin, train):
    logits = np.zeros((1, 2, v), np.float32)
    logits[0, 0, task.loc_ids[peak_bin]] = 10.0
    logits[0, 1, task.tokenizer.eos_id] = 10.0
    return np.asarray(task.token_loss(logits, targets, train))[0]

  near, far, exact = loss(510, True), loss(900, True), loss(500, True)
  assert exact[0] < near[0] < far[0]
  np.testing.assert_allclose(near[1], far[1])  # non-location targets keep the plain cross-entropy
  hard_near, hard_far = loss(510, False), loss(900, False)
  np.testing.assert_allclose(hard_near, hard_far)  # evaluation: a miss is a miss
