"""Export a training workdir to a Hugging Face folder (`tools/convert_to_hf.py`).

A run's task names the family module that writes it (`Task.hf_family`); a family module has `export(run, out) -> HF class name`, writing config.json, model.safetensors and any
model-specific file (generation_config.json) into `out`. Common files are written here: the image
processor (`preprocessor_config.json`, our evaluation preprocessing) and, for runs with text, the
tokenizer (the workdir's tokenizer.json wrapped as `PreTrainedTokenizerFast`), unless the family
module sets `writes_tokenizer` (the two-tower family remaps an id for CLIP).

Everything is written into a temporary folder next to `out` and moved into place at the end, so a
failed or killed export leaves `out` as it was (`files.put_in_place`, with --overwrite too). Only
process 0 writes (every process restores its shards).
"""

import dataclasses
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax import tasks
from vlm_jax.errors import UserError
from vlm_jax.hf import files, vit
from vlm_jax.hf.tokenizer import hf_fast_tokenizer
from vlm_jax.runtime import restore_run


@dataclasses.dataclass
class Run:
  """What a family exporter reads: the run's config, its task (model + tokenizer), numpy params."""
  cfg: object
  task: object
  params: dict
  class_names: list
  encoder_only: bool = False


def load_run(workdir: str, step=None, encoder_only: bool = False, mesh: str = None) -> tuple:
  """Restores a workdir's params (numpy, on every process) with its own config; returns (Run, step)."""
  def exportable(cfg):  # checked before the model is built
    if tasks.module(cfg.task).Task.hf_family is None:
      exportable = [name for name, m in tasks.TASKS.items() if m.Task.hf_family is not None]
      raise UserError(f"task '{cfg.task}' has no Hugging Face export yet (exportable: {', '.join(exportable)}).")
  runtime, params, step = restore_run(workdir, step, edit=exportable, mesh=mesh)
  cfg = runtime.cfg
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  return Run(cfg, runtime.task, params, runtime.data_info.class_names, encoder_only), step


def write(run: Run, out: str) -> str:
  """Writes the HF folder for `run` into the (empty or new) folder `out`; returns the HF class name."""
  family = run.task.hf_family
  name = family.export(run, out)
  files.save_json(out, "preprocessor_config.json", files.image_processor_config(run.cfg.input))
  tok = run.task.tokenizer
  if tok is not None and not run.encoder_only and not getattr(family, "writes_tokenizer", False):
    hf_fast_tokenizer(tok).save_pretrained(out)
  return name


def export_workdir(workdir: str, out: str, step=None, overwrite: bool = False, encoder_only: bool = False,
                   mesh: str = None) -> dict:
  """Exports `workdir` (checkpoint `step`, default the latest) into `out`; returns a summary."""
  out = files.prepare_out(out, overwrite)
  run, step = load_run(workdir, step, encoder_only, mesh)
  if encoder_only and run.task.hf_family is not vit:
    raise UserError("--encoder_only applies to classification runs (a ViT without its head).")
  name = None
  if jax.process_index() == 0:
    tmp = files.new_folder_beside(out)
    try:
      name = write(run, tmp)
      files.put_in_place(tmp, out)  # empty, or --overwrite: the old export goes only once this one is whole
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("hf export written")
  return {"out": out, "step": step, "class": name, "task": run.cfg.task}
