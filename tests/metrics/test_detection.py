"""Tests of the detection metrics: COCO mAP against pycocotools run on COCO JSON files, hand cases,
grounding accuracy."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlm_jax.metrics import detection as D


def _reference(truths, predictions, tmp_path):
  """COCO mAP and mAP@0.5 the way a COCO user computes them: JSON files in COCO's xywh boxes."""
  images = [{"id": 100 + i, "width": 640, "height": 480} for i in range(len(truths))]
  names = sorted({str(o[1]) for objs in (*truths, *predictions) for o in objs})
  cat = {n: 7 + 3 * k for k, n in enumerate(names)}
  anns, dets = [], []
  for i, objs in enumerate(truths):
    for (y1, x1, y2, x2), label in objs:
      anns.append({"id": 1000 + len(anns), "image_id": 100 + i, "category_id": cat[str(label)],
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
  for i, objs in enumerate(predictions):
    for (y1, x1, y2, x2), label, score in objs:
      dets.append({"image_id": 100 + i, "category_id": cat[str(label)],
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
  gt_file, dt_file = tmp_path / "instances.json", tmp_path / "results.json"
  gt_file.write_text(json.dumps({"images": images, "annotations": anns,
                                 "categories": [{"id": c, "name": n} for n, c in cat.items()]}))
  dt_file.write_text(json.dumps(dets))
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(str(gt_file))
    ev = COCOeval(gt, gt.loadRes(str(dt_file)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {"map": ev.stats[0], "map50": ev.stats[1]}


def _box(rng, h=480, w=640):
  y, x = rng.uniform(0, h - 40), rng.uniform(0, w - 40)
  return [y, x, y + rng.uniform(20, h - y), x + rng.uniform(20, w - x)]


def _random_case(rng, n_images=12, labels=("circle", "square", "triangle")):
  truths, preds = [], []
  for i in range(n_images):
    objs = [(_box(rng), labels[rng.integers(len(labels))]) for _ in range(rng.integers(0, 7))]
    dets = []
    for box, label in objs:
      if rng.random() < 0.85:  # found, with a partial overlap; sometimes under another class
        h, w = box[2] - box[0], box[3] - box[1]
        jitter = rng.normal(0, 0.12, 4) * [h, w, h, w]
        wrong = rng.random() < 0.15
        dets.append((list(np.add(box, jitter)), labels[(labels.index(label) + wrong) % len(labels)],
                     float(rng.uniform(0.05, 1))))
    for _ in range(rng.integers(0, 3)):  # false positives
      dets.append((_box(rng), labels[rng.integers(len(labels))], float(rng.uniform(0, 0.6))))
    truths.append(objs)
    preds.append(dets if i != 3 else [])  # one image with objects and no predictions
  truths[5] = []  # one image without objects (its predictions are false positives)
  return truths, preds


def test_equals_pycocotools_on_random_cases(tmp_path):
  rng = np.random.default_rng(0)
  for case in range(3):
    truths, preds = _random_case(rng)
    ours = D.coco_map(truths, preds)
    ref = _reference(truths, preds, tmp_path)
    assert set(ours) == {"map", "map50"}
    assert ours["map"] == pytest.approx(ref["map"], abs=1e-12)
    assert ours["map50"] == pytest.approx(ref["map50"], abs=1e-12)
    # Nontrivial: partial overlaps lose some thresholds, wrong classes and misses cost recall.
    assert 0.05 < ours["map"] < ours["map50"] < 0.95, (case, ours)


def test_hand_checked_values():
  a, b = [0, 0, 100, 100], [200, 300, 260, 400]
  # Perfect predictions.
  assert D.coco_map([[(a, 1), (b, 2)], [(b, 1)]], [[(a, 1, 0.9), (b, 2, 0.8)], [(b, 1, 0.3)]]) == pytest.approx({
      "map": 1.0, "map50": 1.0})
  # Right boxes, every class wrong.
  assert D.coco_map([[(a, 1), (b, 2)]], [[(a, 2, 0.9), (b, 1, 0.8)]]) == {"map": 0.0, "map50": 0.0}
  # A box shifted right by 2.4 px of 10: IoU 7.6 / 12.4 = 0.613, a match at the thresholds
  # .50 .55 .60 and not from .65 (so not at .75) up: mAP 3/10.
  assert D.box_iou([0, 0, 10, 10], [0, 2.4, 10, 12.4]) == pytest.approx(0.6129, abs=1e-4)
  got = D.coco_map([[([0, 0, 10, 10], "x")]], [[([0, 2.4, 10, 12.4], "x", 1.0)]])
  assert got["map50"] == pytest.approx(1.0) and got["map"] == pytest.approx(0.3)
  # An image with no objects: its confident false positive halves the precision; a less
  # confident one comes after the true positive and costs nothing.
  truths = [[(a, "c")], []]
  assert D.coco_map(truths, [[(a, "c", 0.5)], [(b, "c", 0.9)]])["map"] == pytest.approx(0.5)
  assert D.coco_map(truths, [[(a, "c", 0.5)], [(b, "c", 0.1)]])["map"] == pytest.approx(1.0)
  # No predictions at all; no objects at all.
  assert D.coco_map(truths, [[], []]) == {"map": 0.0, "map50": 0.0}
  empty = D.coco_map([[], []], [[(a, "c", 0.5)], []])
  assert math.isnan(empty["map"]) and math.isnan(empty["map50"])
  with pytest.raises(ValueError, match="images"):
    D.coco_map(truths, [[]])


def test_many_objects_in_one_image(tmp_path):
  rng = np.random.default_rng(3)
  grid = [[20 * r, 20 * c, 20 * r + 15, 20 * c + 15] for r in range(10) for c in range(20)]
  for classes in (1, 4):
    truths = [[(box, int(rng.integers(classes))) for box in grid]]
    preds = [[(box, label, float(rng.uniform())) for box, label in truths[0]]]
    assert len(truths[0]) == 200
    got = D.coco_map(truths, preds)
    assert got == pytest.approx(_reference(truths, preds, tmp_path), abs=1e-12)
    if classes == 1:
      # COCO keeps the 100 best-scored detections per image and class: recall stops at 0.5, so
      # 51 of the 101 recall points have precision 1.
      assert got == pytest.approx({"map": 51 / 101, "map50": 51 / 101})
    else:  # about 50 per class: none is cut
      assert got == pytest.approx({"map": 1.0, "map50": 1.0})


def test_coco_box_is_x_y_width_height():
  assert D.coco_box([10, 20, 50, 80]) == [20.0, 10.0, 60.0, 40.0]


def test_box_iou():
  assert D.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
  assert D.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
  assert D.box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0
  assert D.box_iou([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0  # empty union, no division by zero
  np.testing.assert_allclose(D.box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [0, 0, 10, 5]]), [1.0, 0.5])


def test_grounding_accuracy_hand_cases():
  truth = [[0, 0, 10, 10]] * 6
  predicted = [
      [0, 0, 10, 10],        # exact: hit
      [0, 2.4, 10, 12.4],    # IoU 0.61: hit
      [0, 5, 10, 15],        # IoU 1/3: miss
      None,                  # no well-formed box: miss
      np.zeros((0, 4)),      # an empty parse: miss
      [10, 10, 0, 0],        # inverted box: miss
  ]
  assert D.grounding_accuracy(predicted, truth) == {"grounding_acc50": pytest.approx(2 / 6)}
  # IoU exactly 0.5 counts: [0, 0, 10, 10] against [0, 0, 10, 5].
  assert D.grounding_accuracy([[0, 0, 10, 5]], [[0, 0, 10, 10]]) == {"grounding_acc50": 1.0}
  assert math.isnan(D.grounding_accuracy([], np.zeros((0, 4)))["grounding_acc50"])
  with pytest.raises(ValueError, match="true boxes"):
    D.grounding_accuracy([None], truth)
