"""Training objectives. Each module defines `Task(config, data_info)` with the same small interface:

  task.model                      the Flax module
  task.dummy_batch(n)             numpy arrays with the shapes and dtypes of one batch (for init)
  task.init(rng, batch)           boxed params (logical partitioning metadata kept)
  task.loss_fn(params, batch, rng) -> (loss, metrics)      inside the jitted train step
  task.eval_fn(params, batch)     -> dict of per-batch sums (masked by batch["_mask"])
  task.predict_fn(params, batch)  -> dict of predictions (evaluator pictures, predict CLI)
  task.collects_predictions      whether evaluation gathers every batch's predictions to the host
  task.text_fields                the batch's text fields gathered with them (references)
  task.collect(batch, preds)      -> host-side records (prediction, references) when `collects_predictions`
  task.summarize(sums, records)   -> dict of metric values named as in the contract
  task.draw(batch, predictions)   -> list of (image, caption) pairs for the example picture
  task.load_pretrained(params)    -> (params, copied paths): optional, weights the task's config
                                     names (e.g. a Hugging Face text tower), loaded before step 1

`TASKS` maps a config's `task` name to its module; it is the only registry.
"""

from vlm_jax.config import nearest
from vlm_jax.errors import UserError
from vlm_jax.tasks import captioning, classification, contrastive

TASKS = {
    "classification": classification,
    "captioning": captioning,  # and VQA (input.text = "qa")
    "contrastive": contrastive,  # CLIP / SigLIP two-tower
}


def module(name: str):
  """The task module registered as `name`; an unknown name is one error listing the known ones."""
  if name not in TASKS:
    raise UserError(f"config: unknown task '{name}'.{nearest(name, TASKS)} Known tasks: {', '.join(sorted(TASKS))}.")
  return TASKS[name]


def make(cfg, data_info):
  return module(cfg.task).Task(cfg, data_info)
