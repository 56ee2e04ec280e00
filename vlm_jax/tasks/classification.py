"""Image classification with a ViT: softmax cross-entropy, top-1 accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax import flops
from vlm_jax.data import features
from vlm_jax.errors import UserError
from vlm_jax.hf import vit as hf_vit
from vlm_jax.models.vit import ViT
from vlm_jax.tasks import base
from vlm_jax.tasks.common import module_kwargs


class Task(base.Task):
  name = "classification"
  collects_predictions = False  # accuracy is summed on the devices
  hf_family = hf_vit
  needs_classes = True

  @classmethod
  def validate(cls, cfg) -> None:
    if cfg.input.get("text", ""):
      raise UserError(f"config: task 'classification' reads no text, but input.text='{cfg.input.text}'. "
                      f"Leave it empty (--config.input.text=), or use a text task (captioning, contrastive).")

  def __init__(self, cfg, data_info):
    if not data_info.num_classes:
      raise UserError(f"task 'classification' needs a dataset with a class label; '{data_info.name}' has "
                      f"no ClassLabel feature '{cfg.input.label_key}'. Set --config.input.label_key.")
    self.cfg = cfg
    self.class_names = data_info.class_names
    self.image_size = cfg.input.image_size
    try:
      # Only the logits are read, so a class-token-pooled ViT may skip the other tokens' last-layer work.
      self.model = ViT(num_classes=data_info.num_classes, **{"pooled_only": True, **module_kwargs(cfg.model, ViT)})
    except TypeError as e:
      raise UserError(f"model config does not fit ViT: {e}. Check the keys under `model`.") from None

  def features(self, inp) -> tuple:
    return (features.Label(inp.label_key),)

  def dummy_batch(self, n: int) -> dict:
    s = self.image_size
    return {"image": np.zeros((n, s, s, 3), np.float32), "label": np.zeros((n,), np.int32)}

  def init(self, rng, batch):
    return self.model.init({"params": rng}, batch["image"], train=False)["params"]

  def flops(self, example, global_batch):
    return flops.vit_forward(self.model, example["image"].shape[1])

  def _logits(self, params, images, train, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    logits, _ = self.model.apply({"params": params}, images, train=train, rngs=rngs)
    return logits.astype(jnp.float32)

  def loss_fn(self, params, batch, rng):
    logits = self._logits(params, batch["image"], True, rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    acc = (logits.argmax(-1) == batch["label"]).mean()
    return loss, {"loss": loss, "accuracy": acc}

  def eval_fn(self, params, batch):
    logits = self._logits(params, batch["image"], False)
    mask = batch["_mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"correct": ((logits.argmax(-1) == batch["label"]) * mask).sum(),
            "loss": (loss * mask).sum(), "count": mask.sum()}

  def predict_fn(self, params, batch):
    probs = jax.nn.softmax(self._logits(params, batch["image"], False))
    return {"label": probs.argmax(-1), "prob": probs.max(-1)}

  def summarize(self, sums, records=()) -> dict:
    n = max(float(sums["count"]), 1.0)
    return {"accuracy": float(sums["correct"]) / n, "loss": float(sums["loss"]) / n}

  def format(self, preds, image_sizes=None) -> list:
    return [f"{self._name(i)} ({p:.3f})" for i, p in zip(preds["label"], preds["prob"])]

  def draw(self, batch, preds):
    out = []
    for img, label, pred, prob in zip(batch["image"], batch["label"], preds["label"], preds["prob"]):
      ok = int(label) == int(pred)
      text = f"{self._name(pred)} ({prob:.2f})" + ("" if ok else f"\ntrue: {self._name(label)}")
      out.append((img, text, ok))
    return out

  def _name(self, i):
    i = int(i)
    return self.class_names[i] if self.class_names and i < len(self.class_names) else str(i)
