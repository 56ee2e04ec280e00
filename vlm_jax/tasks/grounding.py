"""Grounding (referring expressions, LocCa's AREF): an expression ("the small red circle") -> the
box of the one object it names, as 4 location tokens.

Training reads one random expression of the image per example and step (`input.ref_key`, its
box `input.ref_box_key`: y1 x1 y2 x2 normalised); evaluation reads every expression (one row
each), decodes the box from the expression prompt and reports `grounding_acc50` (the share of
expressions whose predicted box has IoU >= 0.5 with the true one; no well-formed box counts as
wrong) and teacher-forced `loss` / `perplexity`. With `evals.constrained` (the recipe sets it),
greedy decoding may only write 4 location tokens and EOS, so every answer is a box. `python -m vlm_jax.predict --refer TEXT`
prints the box as JSON in pixels of the original image.
"""

import json

import numpy as np

from vlm_jax.data import features, loc_tokens, tokenizer as tokenizer_lib
from vlm_jax.errors import UserError
from vlm_jax.metrics import detection as detection_metrics
from vlm_jax.tasks import locate



class Task(locate.Task):
  name = "grounding"
  prompt_option = "refer"
  prompt_help = "Find the object this referring expression names (grounding runs); prints its box."
  text_fields = ("ref", "ref_box")

  input_keys = ("ref_key", "ref_box_key")

  @classmethod
  def predict_config(cls, cfg, prompt: str) -> None:
    if not prompt:
      raise UserError("a grounding run boxes what an expression names: pass --refer TEXT, "
                      "e.g. --refer \"the small red circle\".")

  def __init__(self, cfg, data_info):
    super().__init__(cfg, data_info)
    box = self.box_range()
    eos = self.tokenizer.eos_id
    self.constrain(box and (box,) * 4 + ((eos, eos + 1),))  # exactly one box, then EOS

  def features(self, inp) -> tuple:
    return (features.Refs(inp.ref_key, inp.ref_box_key),)

  def encode(self, batch: dict, train: bool, stats) -> dict:
    answers = [loc_tokens.format_objects(box[None]) for box in batch["ref_box"]]
    return self._sequences(batch, tokenizer_lib.texts(batch, "ref"), answers, train, stats)

  def boxes(self, tokens) -> list:
    """The first well-formed box (normalised) of each row of generated tokens, or None."""
    return [p.boxes[0] if len(p.boxes) else None for p in self.parse(tokens)]

  def collect(self, batch, preds) -> list:
    keep = np.asarray(batch["_mask"]) == 1
    boxes = self.boxes(preds["tokens"])
    return [(boxes[i], np.asarray(batch["ref_box"][i])) for i in np.flatnonzero(keep)]

  def summarize(self, sums, records=()) -> dict:
    out = self.loss_summary(sums)
    if records:
      out.update(detection_metrics.grounding_accuracy([p for p, _ in records], [t for _, t in records]))
    return out

  def format(self, preds, image_sizes=None) -> list:
    rows = []
    for i, box in enumerate(self.boxes(preds["tokens"])):
      h, w = image_sizes[i] if image_sizes else (1, 1)
      rows.append(json.dumps([] if box is None else
                             [{"box": [round(float(v), 1) for v in box * np.array([h, w, h, w])]}]))
    return rows

  def draw(self, batch, preds):
    mean, std = self.cfg.input.mean, self.cfg.input.std
    items = []
    for img, expr, true, pred in zip(batch["image"], tokenizer_lib.texts(batch, "ref"), batch["ref_box"],
                                     self.boxes(preds["tokens"])):
      img = locate.draw_boxes(img, [true], locate.TRUE_COLOR, mean, std)
      if pred is not None:
        img = locate.draw_boxes(img, [pred], locate.PREDICTED_COLOR, mean, std)
      ok = pred is not None and detection_metrics.box_iou(pred, true) >= 0.5
      items.append((img, expr, bool(ok)))
    return items
