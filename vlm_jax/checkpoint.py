"""Orbax checkpoints of the TrainState: async save, keep-N, restore onto any mesh, safe fallback.

Before restoring, the checkpoint's recorded tree is compared with the state this config builds;
a checkpoint of another model shape is refused with a message naming the first mismatching
parameter, and is never overwritten (training does not start).
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from vlm_jax.errors import UserError
from vlm_jax.optim import param_path


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                        item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises UserError when the checkpoint's arrays do not match `abstract_state` in path or shape."""
    meta = self.manager.item_metadata(step)
    saved = {param_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]
             if hasattr(m, "shape")}
    wanted = {param_path(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    where = f"checkpoint {self.directory}/{step}"
    for path, shape in wanted.items():
      if path not in saved:
        raise UserError(f"{where} belongs to a different model: it has no parameter '{path}'. "
                        f"Use a new --workdir for this config (the checkpoint was left untouched).")
      if saved[path] != shape:
        raise UserError(f"{where} belongs to a different model shape: '{path}' is {saved[path]} there but "
                        f"{shape} in this config. Use a new --workdir or the checkpoint's config "
                        f"(the checkpoint was left untouched).")
    extra = sorted(set(saved) - set(wanted))
    if extra:
      raise UserError(f"{where} belongs to a different model: it has parameter '{extra[0]}' that this "
                      f"config does not build. Use a new --workdir (the checkpoint was left untouched).")

  def restore(self, step: int, abstract_state):
    """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    self.check_compatible(step, abstract_state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


def _checkpoint_params(spec: str) -> dict:
  """{param path: numpy array} of a workdir's checkpoint; `spec` is 'WORKDIR' or 'WORKDIR:STEP'."""
  path, _, step = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
  directory = os.path.join(os.path.abspath(os.path.expanduser(path)), "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"init_from='{spec}': '{directory}' does not exist. Point init_from at the workdir "
                    f"of an earlier run (optionally WORKDIR:STEP), or at a Hugging Face folder as 'hf:PATH'.")
  source = Checkpointer(directory, async_save=False)
  step = int(step) if step else source.latest_step()
  if step is None or step not in source.manager.all_steps():
    raise UserError(f"init_from='{spec}': no such checkpoint in {directory} "
                    f"(steps: {sorted(source.manager.all_steps()) or 'none'}).")
  meta = source.manager.item_metadata(step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  saved = jax.device_get(source.manager.restore(step, args=ocp.args.StandardRestore(abstract)))
  source.close()
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}


def _hf_params(spec: str, target) -> dict:
  """{param path: numpy array} read from a local Hugging Face folder ('hf:PATH'), shaped by `target`."""
  from vlm_jax.hf.load import params_from_hf

  tree = params_from_hf(os.path.expanduser(spec[len(HF_PREFIX):]), target)
  return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


HF_PREFIX = "hf:"


def load_params(spec: str, target: dict, include: str = ".*", prefix: str = "") -> tuple[dict, list]:
  """Initialises `target` params from another run ('WORKDIR' or 'WORKDIR:STEP') or from a local
  Hugging Face model folder ('hf:PATH': ViT, SigLIP vision, or a VisionEncoderDecoderModel we exported).

  The source's parameter paths get `prefix` prepended (e.g. 'img/' places a classification run's
  ViT as a captioner's image tower).
  Parameters whose path matches `include` and exists in the source with the same shape are
  copied; a position embedding of another length (another resolution) is resized bilinearly;
  the rest keeps its fresh initialisation. Returns (params as numpy, list of copied paths).
  """
  import re

  from vlm_jax.models.vit import resize_posemb

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
