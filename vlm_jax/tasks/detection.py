"""Detection as a sequence (Pix2Seq, PaliGemma): "detect" -> every object as 4 location tokens and
its class words, objects joined by " ; ".

Training reads each image's objects (`input.boxes_key`: y1 x1 y2 x2 normalised, as tfds'
BBoxFeature; `input.object_label_key`: a ClassLabel, whose names are the target words; at most
`input.max_objects`) in a random order per example and step, so the model learns a set rather
than an order. Evaluation decodes from the prompt (`evals.decode`), reads the boxes back
(`loc_tokens.parse_objects`) and scores each object by its tokens' mean log-probability under the
model (the decoded sequence re-read with teacher forcing), then reports COCO `map` and `map50`
by pycocotools (`metrics.detection.coco_map`) and teacher-forced `loss` / `perplexity`.
The predict CLI prints each image's objects as JSON in pixels of the original image.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.data import features, loc_tokens
from vlm_jax.errors import UserError
from vlm_jax.metrics import detection as detection_metrics
from vlm_jax.tasks import locate

PROMPT = "detect"


class Task(locate.Task):
  name = "detection"
  prompt_option = None
  text_fields = ("objects_boxes", "objects_labels", "objects_count")

  input_keys = ("boxes_key", "object_label_key", "max_objects")

  @classmethod
  def validate(cls, cfg) -> None:
    super().validate(cfg)
    if cfg.input.max_objects < 1:
      raise UserError(f"config: input.max_objects={cfg.input.max_objects} must be at least 1.")

  def __init__(self, cfg, data_info):
    super().__init__(cfg, data_info)
    key = cfg.input.object_label_key
    names = (data_info.label_names or {}).get(key)
    if names is None and key == cfg.input.label_key:
      names = data_info.class_names
    if not names:
      raise UserError(f"dataset '{data_info.name}' has no ClassLabel feature '{key}' to name the objects; "
                      f"set --config.input.object_label_key to one (it has {sorted(data_info.label_names)}).")
    self.names = list(names)
    self.prompt_ids = self.tokenizer.prompt_sequences([PROMPT], cfg.input.max_len)[0][0]
    self.prompt_len = int((self.prompt_ids != self.tokenizer.pad_id).sum())

  def features(self, inp) -> tuple:
    return (features.Objects(inp.boxes_key, inp.object_label_key, inp.max_objects),)

  def targets(self, batch) -> list:
    """The answer text of each row: its objects in the batch's (shuffled, when training) order."""
    out = []
    for boxes, labels, n in zip(batch["objects_boxes"], batch["objects_labels"], batch["objects_count"]):
      out.append(loc_tokens.format_objects(boxes[:n], [self.names[i] for i in labels[:n]]))
    return out

  def encode(self, batch: dict, train: bool, stats) -> dict:
    return self._sequences(batch, [PROMPT] * len(batch["image"]), self.targets(batch), train, stats)

  def predict_inputs(self, images, prompt: str = "") -> dict:
    return {"image": images, "prompt": np.repeat(self.prompt_ids[None], len(images), axis=0)}

  def predict_fn(self, params, batch):
    prompt = batch["prompt"][:, :self.prompt_len]  # the same prompt in every row: no padding
    tokens = self.decoder(self.model, params, batch["image"], batch["prompt"])
    seq = jnp.concatenate([prompt, tokens], axis=1)
    logits = self.model.apply({"params": params}, batch["image"], seq[:, :-1], train=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    logp = jnp.take_along_axis(logp, seq[:, 1:, None], axis=-1)[..., 0]
    return {"tokens": tokens, "logp": logp[:, self.prompt_len - 1:]}

  def objects(self, tokens, logp) -> list:
    """[(box normalised, label, score)] of one row of generated tokens. An object's tokens run
    from its first location token to the next object's; its score is exp(their mean log-prob)."""
    ids = [int(t) for t in tokens]
    if self.tokenizer.eos_id in ids:
      ids = ids[:ids.index(self.tokenizer.eos_id)]
    is_loc = np.isin(ids, self.loc_ids)
    starts = [i for i in range(len(ids)) if is_loc[i] and (i == 0 or not is_loc[i - 1])]
    out = []
    for a, b in zip(starts, starts[1:] + [len(ids)]):
      parsed = loc_tokens.parse_objects(ids[a:b], self.tokenizer)
      if len(parsed.boxes) == 1:
        out.append((parsed.boxes[0], parsed.labels[0], float(np.exp(np.mean(logp[a:b])))))
    return out

  def _truth(self, batch, i) -> list:
    n = int(batch["objects_count"][i])
    return [(batch["objects_boxes"][i][j], self.names[int(batch["objects_labels"][i][j])]) for j in range(n)]

  def collect(self, batch, preds) -> list:
    keep = np.asarray(batch["_mask"]) == 1
    return [(self.objects(preds["tokens"][i], preds["logp"][i]), self._truth(batch, i))
            for i in np.flatnonzero(keep)]

  def summarize(self, sums, records=()) -> dict:
    out = self.loss_summary(sums)
    if records:
      scale = self.cfg.input.image_size  # pixels of the model's input: COCO's area ranges are in pixels
      truths = [[(np.asarray(b) * scale, lab) for b, lab in truth] for _, truth in records]
      predictions = [[(np.asarray(b) * scale, lab, s) for b, lab, s in pred] for pred, _ in records]
      out.update(detection_metrics.coco_map(truths, predictions))
    return out

  def format(self, preds, image_sizes=None) -> list:
    rows = []
    for i, (tokens, logp) in enumerate(zip(np.asarray(preds["tokens"]), np.asarray(preds["logp"]))):
      h, w = image_sizes[i] if image_sizes else (1, 1)
      rows.append(json.dumps([{"box": [round(float(v), 1) for v in box * np.array([h, w, h, w])],
                               "label": label, "score": round(score, 4)}
                              for box, label, score in self.objects(tokens, logp)]))
    return rows

  def draw(self, batch, preds):
    mean, std = self.cfg.input.mean, self.cfg.input.std
    items = []
    for i, img in enumerate(batch["image"]):
      truth = self._truth(batch, i)
      pred = self.objects(preds["tokens"][i], preds["logp"][i])
      img = locate.draw_boxes(img, [b for b, _ in truth], locate.TRUE_COLOR, mean, std)
      img = locate.draw_boxes(img, [b for b, _, _ in pred], locate.PREDICTED_COLOR, mean, std)
      ok = len(pred) == len(truth) and all(
          any(lab == pl and detection_metrics.box_iou(b, pb) >= 0.5 for pb, pl, _ in pred) for b, lab in truth)
      items.append((img, "; ".join(f"{lab} {s:.2f}" for _, lab, s in pred) or "(nothing)", ok))
    return items
