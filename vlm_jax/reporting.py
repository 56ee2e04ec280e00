"""What a run reports: metrics.jsonl, TensorBoard scalars, a progress bar, example pictures.

Only process 0 writes. Every metrics.jsonl line is one JSON object with `step`; evaluation
metrics are named `SPLIT/METRIC` (e.g. `test/accuracy`).
"""

import json
import math
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw
from tensorboardX import SummaryWriter
from tqdm import tqdm


class MetricsWriter:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _scalar(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    for k, v in clean.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self.tb.add_scalar(k, v, int(step))

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


# Wall-clock figures: the only logged values that differ between a resumed and an uninterrupted run.
CLOCK_METRICS = ("train/images_per_s", "train/tokens_per_s", "train/tflops_per_device", "train/mfu")


def read_metrics(workdir: str, clock: bool = True) -> list:
  """The rows of WORKDIR/metrics.jsonl; `clock=False` drops the wall-clock figures."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows if clock else [{k: v for k, v in r.items() if k not in CLOCK_METRICS} for r in rows]


class Progress:
  """tqdm bar over steps with ETA; `update` shows loss and throughput."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                    unit="step", mininterval=2.0, smoothing=0.1)

  def update(self, n: int = 1, **postfix):
    if postfix:
      self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                           refresh=False)
    self.bar.update(n)

  def write(self, text: str):
    self.bar.write(text)

  def close(self):
    self.bar.close()


def draw_grid(items, path: str, mean, std, cell: int = 160, cols: int = 4) -> None:
  """items: (normalised image [H, W, 3], text, ok) -> a PNG grid with the text under each image."""
  if not items:
    return
  rows = -(-len(items) // cols)
  text_h = 112  # up to 8 wrapped lines: a caption and its reference
  canvas = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
  draw = ImageDraw.Draw(canvas)
  for k, (img, text, ok) in enumerate(items):
    pixels = np.clip((np.asarray(img, np.float32) * np.asarray(std) + np.asarray(mean)) * 255, 0, 255)
    tile = Image.fromarray(pixels.astype(np.uint8)).resize((cell - 8, cell - 8), Image.NEAREST)
    x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
    canvas.paste(tile, (x + 4, y + 4))
    lines = [ln for part in str(text).split("\n") for ln in textwrap.wrap(part, 26)][:8]
    draw.multiline_text((x + 4, y + cell), "\n".join(lines), fill=(0, 110, 0) if ok else (190, 0, 0))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  canvas.save(path)
