"""The typed task interface: every registered task is a `tasks.base.Task`, and moving the tasks
onto it left their batches unchanged (digests recorded from the code before the interface)."""

import hashlib
import os

import jax
import numpy as np
import pytest

from vlm_jax import config, flops, tasks
from vlm_jax.data import pipeline
from vlm_jax.runtime import build
from vlm_jax.tasks import base

from conftest import REPO

# sha256 (first 16 hex digits) of the first 2 train batches (seed 0, local batch 8) and the first
# validation batch (batch 8) of shapes/tiny, as the pipeline produced them before the interface.
DIGESTS = {
    "vit_shapes": (("091ec368b0c59809", "6d784c515a229155"), "55d55b8d3eb57221"),
    "cappa_shapes": (("76d13de51f34cfd5", "7d04f84c02b3da5e"), "f172da192b0790ed"),
    "vqa_shapes": (("e46f3e003d560f87", "012d0b125f398a64"), "3ced1cca9ba7a272"),
    "siglip_shapes": (("cf08f8cdef86552d", "f79fc1c5338ddfac"), "9fbac111b5b0e578"),
}


def digest(batch: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(batch):
    v = np.asarray(batch[k])
    h.update(f"{k}:{v.dtype}:{v.shape}".encode())
    h.update(np.ascontiguousarray(v).tobytes())
  return h.hexdigest()[:16]


def test_every_registered_task_is_a_base_task():
  for name, module in tasks.TASKS.items():
    assert issubclass(module.Task, base.Task) and module.Task.name == name
    assert module.Task.hf_family is not None and hasattr(module.Task.hf_family, "export")


@pytest.mark.parametrize("recipe", sorted(DIGESTS))
def test_batches_are_those_of_the_tasks_before_the_interface(data_dir, recipe):
  cfg = config.load(os.path.join(REPO, f"configs/{recipe}.py:tiny"))
  cfg.data_dir = data_dir
  task = build(cfg, devices=jax.devices()[:1]).task
  feats = task.features(cfg.input)
  it = pipeline.train_batches(cfg.input, data_dir, 0, 8, features=feats, encode=task.encode)
  train = tuple(digest(next(it)) for _ in range(2))
  _, ev = pipeline.eval_batches(cfg.input, data_dir, "validation", 8, features=feats, encode=task.encode)
  assert (train, digest(next(ev))) == DIGESTS[recipe]


def test_task_flops_are_the_model_formulas(data_dir):
  cfg = config.load(os.path.join(REPO, "configs/cappa_shapes.py:tiny"))
  cfg.data_dir = data_dir
  task = build(cfg, devices=jax.devices()[:1]).task
  example = task.dummy_batch(1)
  size, length = cfg.input.image_size, cfg.input.max_len - 1
  assert task.flops(example, 64) == flops.captioner_forward(task.model, size, length)
  fwd, embed = task.flops(example, 64)
  assert flops.train_flops(task.flops(example, 64)) == 3 * fwd - embed > 0
