"""Initialisation of a model's params from another run or a local Hugging Face folder (`init_from`).

`load_params` copies the parameters that match a regex and exist with the same shape in the source;
a position embedding of another length (another resolution) is resized; the rest keeps its fresh
initialisation.
"""

import os
import re

import jax
import numpy as np

from vlm_jax import checkpoint, workdir
from vlm_jax.errors import UserError
from vlm_jax.hf.load import params_from_hf
from vlm_jax.models.vit import resize_posemb
from vlm_jax.optim import param_path

HF_PREFIX = "hf:"


def _square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


def _checkpoint_params(spec: str) -> dict:
  """{param path: numpy array} of a workdir's checkpoint; `spec` is 'WORKDIR' or 'WORKDIR:STEP'."""
  path, _, step = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
  directory = os.path.join(workdir.local_dir(path, "init_from"), "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"init_from='{spec}': '{directory}' does not exist. Point init_from at the workdir "
                    f"of an earlier run (optionally WORKDIR:STEP), or at a Hugging Face folder as 'hf:PATH'.")
  source = checkpoint.Checkpointer(directory, async_save=False)
  step = int(step) if step else source.latest_step()
  if step is None or step not in source.manager.all_steps():
    raise UserError(f"init_from='{spec}': no such checkpoint in {directory} "
                    f"(steps: {sorted(source.manager.all_steps()) or 'none'}).")
  saved = source.restore_host(step)
  source.close()
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}


def _hf_params(spec: str, target) -> dict:
  """{param path: numpy array} read from a local Hugging Face folder ('hf:PATH'), shaped by `target`."""
  tree = params_from_hf(os.path.expanduser(spec[len(HF_PREFIX):]), target)
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}



def load_params(spec: str, target: dict, include: str = ".*", prefix: str = "") -> tuple[dict, list]:
  """Initialises `target` params from another run ('WORKDIR' or 'WORKDIR:STEP') or from a local
  Hugging Face model folder ('hf:PATH': ViT, SigLIP vision, or a VisionEncoderDecoderModel we exported).

  The source's parameter paths get `prefix` prepended (e.g. 'img/' places a classification run's
  ViT as a captioner's image tower).
  Parameters whose path matches `include` and exists in the source with the same shape are
  copied; a position embedding of another length (another resolution) is resized bilinearly;
  the rest keeps its fresh initialisation. Returns (params as numpy, list of copied paths).
  """
  target = jax.device_get(target)
  flat = _hf_params(spec, target) if spec.startswith(HF_PREFIX) else _checkpoint_params(spec)
  flat = {prefix + k: v for k, v in flat.items()}
  rx, copied = re.compile(include), []

  def pick(p, x):
    name, x = param_path(p), np.asarray(x)
    if not rx.search(name) or name not in flat:
      return x
    src = flat[name]
    if src.shape == x.shape:
      copied.append(name)
      return src.astype(x.dtype)
    if name.endswith("pos_embedding") and src.ndim == 3 and src.shape[-1] == x.shape[-1]:
      for n_prefix in (0, 1):
        if _square(src.shape[1] - n_prefix) and _square(x.shape[1] - n_prefix):
          copied.append(name)
          return resize_posemb(src, x.shape[1], n_prefix).astype(x.dtype)
    raise UserError(f"init_from='{spec}': parameter '{name}' is {src.shape} there but {x.shape} here. "
                    f"Exclude it with --config.init_include (a regex of parameters to load).")
  params = jax.tree_util.tree_map_with_path(pick, target)
  if not copied:
    raise UserError(f"init_from='{spec}': no parameter matched init_include='{include}' (source paths "
                    f"look like '{next(iter(flat), '')}', this model's like "
                    f"'{param_path(jax.tree_util.tree_flatten_with_path(target)[0][0][0])}'; "
                    f"--config.init_prefix adds a prefix to the source's).")
  return params, copied
