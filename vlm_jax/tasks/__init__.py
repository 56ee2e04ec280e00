"""Training objectives. Each module defines `Task(cfg, data_info)`, a subclass of `tasks.base.Task`,
whose docstring documents the interface every task implements.

`TASKS` maps a config's `task` name to its module; it is the only registry.
"""

from vlm_jax.config import nearest
from vlm_jax.errors import UserError
from vlm_jax.tasks import captioning, classification, contrastive, detection, grounding

TASKS = {
    "classification": classification,
    "captioning": captioning,  # and VQA (input.text = "qa")
    "contrastive": contrastive,  # CLIP / SigLIP two-tower
    "detection": detection,  # boxes as location tokens (Pix2Seq)
    "grounding": grounding,  # referring expression -> box
}


def module(name: str):
  """The task module registered as `name`; an unknown name is one error listing the known ones."""
  if name not in TASKS:
    raise UserError(f"config: unknown task '{name}'.{nearest(name, TASKS)} Known tasks: {', '.join(sorted(TASKS))}.")
  return TASKS[name]


def validate(cfg) -> None:
  """The task's own config checks (`Task.validate`); an unknown task is refused first."""
  module(cfg.task).Task.validate(cfg)


def make(cfg, data_info):
  validate(cfg)
  return module(cfg.task).Task(cfg, data_info)
