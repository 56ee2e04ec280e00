"""Detection and grounding metrics: COCO mAP by pycocotools (the field's reference), IoU accuracy.

Boxes are y1 x1 y2 x2 (top, left, bottom, right) in pixels, the order of `data.loc_tokens`; COCO's
own boxes are x y width height, and `coco_map` converts. Labels are any hashable values (class
ids or names) and only need to be consistent between truth and predictions. The functions return
bare metric names ("map", "map50", "grounding_acc50"); the evaluation loop adds the split prefix.
"""

import contextlib
import io
import math
from typing import Hashable, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# A (box, label) ground-truth object and a (box, label, score) prediction.
Truth = tuple[Sequence[float], Hashable]
Prediction = tuple[Sequence[float], Hashable, float]


def coco_box(box) -> list:
  """A y1 x1 y2 x2 box as COCO's [x, y, width, height]."""
  y1, x1, y2, x2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def _coco(images: list, categories: list, annotations: list) -> COCO:
  coco = COCO()
  coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
  coco.createIndex()
  return coco


def coco_map(truths: Sequence[Sequence[Truth]], predictions: Sequence[Sequence[Prediction]]) -> dict:
  """{'map': COCO mAP@[.5:.95], 'map50': mAP@0.5} of per-image predictions, by pycocotools' COCOeval.

  `truths[i]` lists the (box, label) objects of image i (possibly none); `predictions[i]` its
  (box, label, score) detections (possibly none). As in COCO, at most the 100 best-scored
  detections per image and class count (200 objects of one class in an image give recall 0.5).
  Both values are NaN when no image has a ground-truth object (pycocotools reports -1: undefined).
  COCOeval's printing is captured, not shown.
  """
  if len(truths) != len(predictions):
    raise ValueError(f"{len(truths)} images of ground truth but {len(predictions)} of predictions")
  labels = {}  # label -> COCO category id, in order of first appearance
  for objs in (*truths, *predictions):
    for obj in objs:
      labels.setdefault(obj[1], len(labels) + 1)
  images = [{"id": i + 1} for i in range(len(truths))]
  categories = [{"id": c, "name": str(label)} for label, c in labels.items()]
  gt_anns, dt_anns = [], []
  for i, objs in enumerate(truths):
    for box, label in objs:
      xywh = coco_box(box)
      gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": labels[label],
                      "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
  if not gt_anns:
    return {"map": math.nan, "map50": math.nan}
  for i, objs in enumerate(predictions):
    for box, label, score in objs:
      dt_anns.append({"image_id": i + 1, "category_id": labels[label], "bbox": coco_box(box),
                      "score": float(score)})
  with contextlib.redirect_stdout(io.StringIO()):
    gt = _coco(images, categories, gt_anns)
    # loadRes is the reference's own reader of detections; it cannot take an empty list.
    dt = gt.loadRes(dt_anns) if dt_anns else _coco(images, categories, [])
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {"map": float(ev.stats[0]), "map50": float(ev.stats[1])}


def box_iou(a, b) -> np.ndarray:
  """IoU of boxes a [..., 4] and b [..., 4] (y1 x1 y2 x2, broadcast); 0 where the union is empty."""
  a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
  h = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  w = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = h * w

  def area(x):
    return np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)

  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def grounding_accuracy(predicted: Sequence, truth) -> dict:
  """{'grounding_acc50': share of expressions whose predicted box has IoU >= 0.5 with the true
  box}. `predicted[i]` is a box or None / an empty array when the model gave no well-formed
  box (counted as wrong); `truth` is [N, 4]."""
  truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
  if len(predicted) != len(truth):
    raise ValueError(f"{len(predicted)} predictions but {len(truth)} true boxes")
  if not len(truth):
    return {"grounding_acc50": math.nan}
  hits = 0
  for box, true in zip(predicted, truth):
    if box is None or np.size(box) == 0:
      continue
    hits += bool(box_iou(np.asarray(box, dtype=np.float64).reshape(4), true) >= 0.5)
  return {"grounding_acc50": hits / len(truth)}
