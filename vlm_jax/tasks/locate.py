"""What detection and grounding share: a captioner that answers a prompt with location tokens.

Both tasks are VQA-shaped sequences (`[BOS] prompt [SEP] answer [EOS]`, loss on the answer and
EOS) whose answers hold boxes as `<locNNNN>` tokens (`data.loc_tokens`, added to the run's
tokenizer and saved with it). Evaluation decodes from the prompt (`evals.decode`) and reads the
boxes back with `loc_tokens.parse_objects`; pictures draw the true boxes in green and the
predicted ones in red.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import decode
from vlm_jax.data import loc_tokens
from vlm_jax.errors import UserError
from vlm_jax.tasks import captioning

TRUE_COLOR, PREDICTED_COLOR = (0, 200, 0), (230, 30, 30)


class Task(captioning.Task):
  fixed_mode = "qa"
  input_keys = ()  # the input.* keys the task reads, set by its recipes (no input.text mode)

  @classmethod
  def validate(cls, cfg) -> None:
    missing = [k for k in cls.input_keys if k not in cfg.input]
    if missing:
      raise UserError(f"config: task '{cls.name}' reads input.{', input.'.join(missing)}; set them in the "
                      f"recipe (configs/{cls.name}_shapes.py shows them).")

  @classmethod
  def predict_config(cls, cfg, prompt: str) -> None:
    pass

  def __init__(self, cfg, data_info):
    super().__init__(cfg, data_info)
    self.text_fields = type(self).text_fields  # the captioner's are texts; these are boxes
    self.loc_ids = loc_tokens.loc_token_ids(self.tokenizer)

  def box_range(self):
    """[start, stop) of the location token ids when they are contiguous in bin order (as
    `add_loc_tokens` appends them), else None."""
    first = int(self.loc_ids[0])
    return (first, first + loc_tokens.NUM_BINS) if (np.diff(self.loc_ids) == 1).all() else None

  def constrain(self, allowed) -> None:
    """Decodes with `allowed` token ranges for the first generated tokens (`decode.greedy`),
    when `evals.constrained` is set and decoding is greedy or sampling (beam search is not
    constrained)."""
    if self.cfg.evals.get("constrained", False) and self.cfg.evals.decode != "beam" and allowed:
      self.decoder = decode.decode_fn(self.cfg.evals.decode, **self.decode_options, allowed=tuple(allowed))

  def token_loss(self, logits, targets, train: bool):
    """With `model.loc_sigma` > 0 (bins), training targets a location token with a Gaussian over
    the neighbouring bins instead of the one bin, so that a near miss costs less than a far one;
    evaluation's loss (and perplexity) stays the plain cross-entropy."""
    hard = super().token_loss(logits, targets, train)
    sigma = float(self.cfg.model.get("loc_sigma", 0.0))
    if not train or sigma <= 0:
      return hard
    match = targets[..., None] == jnp.asarray(self.loc_ids)  # [B, T, 1024]
    is_loc, bins = match.any(-1), jnp.argmax(match, -1)
    grid = jnp.arange(loc_tokens.NUM_BINS, dtype=jnp.float32)
    soft = jax.nn.softmax(-0.5 * ((grid - bins[..., None].astype(jnp.float32)) / sigma) ** 2, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    smooth = -(soft * jnp.take(logp, jnp.asarray(self.loc_ids), axis=-1)).sum(-1)
    return jnp.where(is_loc, smooth, hard)

  def make_tokenizer(self, cfg):
    return loc_tokens.add_loc_tokens(super().make_tokenizer(cfg))

  def _sequences(self, batch, prompts, answers, train, stats):
    """tokens / loss_mask (and `prompt` for evaluation) of prompt -> answer texts; training
    batches drop the `text_fields`."""
    seq = self.tokenizer.vqa_sequences(prompts, answers, self.cfg.input.max_len)
    stats.add(len(prompts), seq.truncated, self.cfg.input.max_len)
    batch["tokens"], batch["loss_mask"] = seq.tokens, seq.loss_mask
    if train:  # the fields the targets came from; evaluation keeps them for `collect`
      for k in self.text_fields:
        del batch[k]
    else:
      batch["prompt"], _ = self.tokenizer.prompt_sequences(prompts, self.cfg.input.max_len)
    return batch

  def parse(self, tokens) -> list:
    """`loc_tokens.Parsed` objects (normalised boxes) of each row of generated tokens."""
    return [loc_tokens.parse_objects(row, self.tokenizer) for row in np.asarray(tokens)]


def draw_boxes(image, boxes, color, mean, std, width: int = 1) -> np.ndarray:
  """A normalised image [H, W, 3] (as evaluation feeds it: (pixel / 255 - mean) / std) with the
  outlines of `boxes` (normalised y1 x1 y2 x2) in `color` (RGB 0-255)."""
  img = np.array(image, dtype=np.float32, copy=True)
  h, w = img.shape[:2]
  c = (np.asarray(color, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  for y1, x1, y2, x2 in np.asarray(boxes, np.float64).reshape(-1, 4):
    t, b = (int(np.clip(round(v * (h - 1)), 0, h - 1)) for v in (y1, y2))
    l, r = (int(np.clip(round(v * (w - 1)), 0, w - 1)) for v in (x1, x2))
    img[t:t + width, l:r + 1] = c
    img[max(b - width + 1, 0):b + 1, l:r + 1] = c
    img[t:b + 1, l:l + width] = c
    img[t:b + 1, max(r - width + 1, 0):r + 1] = c
  return img
