"""Orbax checkpoints of the TrainState: async save, keep-N, restore onto any mesh, safe fallback.

Before restoring, the checkpoint's recorded tree is compared with the state this config builds;
a checkpoint of another model shape is refused with a message naming the first mismatching
parameter, and is never overwritten (training does not start).

Damage: a save killed midway stays as `STEP.orbax-checkpoint-tmp`, which Orbax never lists.
A finalized step whose files are damaged fails only when restored: `restore_latest` warns and
falls back to the next older step, and moves the damaged one aside to `STEP.damaged` (nothing
is deleted) so that the resumed run can save that step again. When no step restores, it is one
error naming the directory. Orbax's keep-N deletes old steps only after the new one committed
(also with async saves), so the last good checkpoint survives a crash or a failed save; a
failed save (disk full, permissions) becomes one error naming the step and the step kept.
One training run per workdir at a time (`WorkdirLock`).
"""

import errno
import fcntl
import json
import logging
import os
import socket
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from vlm_jax.errors import UserError
from vlm_jax.optim import param_path


def _type_handlers():
  """Orbax's standard type handlers, with replica-parallel array saving only across processes.

  Replica-parallel saving splits each replicated array into one slice per replica so that several
  hosts share its write. In one process it saves nothing, and it compiles one slicing program per
  array shape on the first save: 20 s for 60 small replicated arrays on 8 CPU devices, against
  0.3 s without it.
  """
  th = ocp.type_handlers
  pairs = [(t, th.get_type_handler(t)) for t in th.supported_types() if t is not jax.Array]
  arrays = th.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
  return th.create_type_handler_registry(*pairs, (jax.Array, arrays))


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handler)
    self._unconfirmed = None  # the step of an async save not yet known to be committed

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, force: bool = False) -> bool:
    self.wait()  # a failure of the previous async save surfaces here, naming that step
    with _SaveFailure(self, step):
      saved = self.manager.save(step, args=ocp.args.PyTreeSave(state), force=force)
    self._unconfirmed = step if saved else None
    return saved

  def save_now(self, step: int, state) -> None:
    """Saves `step` unless it is already saved, and waits until it is committed."""
    if step not in self.manager.all_steps():
      self.save(step, state, force=True)
    self.wait()

  def finalized_steps(self) -> list:
    """Committed steps on disk (a killed or failed save stays a `*.orbax-checkpoint-tmp`)."""
    try:
      return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    except OSError:
      return []

  def restore_latest(self, abstract_state):
    """(state, step) of the newest step that restores, or (None, None) for an empty directory."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state)
      except UserError:
        raise
      except Exception as e:  # damaged or missing files: Orbax/TensorStore raise many types
        failed.append(step)
        _quiet_abandoned_reads()
        _warn(f"checkpoint {self.directory}/{step} cannot be restored ({_reason(e)}); trying an older step.")
        continue
      if failed:
        self._set_aside(failed)
        _warn(f"resuming from step {step}; the damaged step(s) {', '.join(map(str, failed))} were moved "
              f"to {self.directory}/STEP.damaged (nothing was deleted).")
      return state, step
    if failed:
      raise UserError(f"no checkpoint in {self.directory} can be restored (steps {', '.join(map(str, failed))} "
                      f"are damaged; nothing was deleted). Restore the directory from a backup, or move it "
                      f"away to start this run from scratch.")
    return None, None

  def _set_aside(self, steps) -> None:
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, i = src + ".damaged", 1
        while os.path.exists(dst):
          dst, i = f"{src}.damaged{i}", i + 1
        os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    self.manager.reload()

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises UserError when the checkpoint's arrays do not match `abstract_state` in path or shape."""
    meta = self.manager.item_metadata(step)
    saved = {param_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]
             if hasattr(m, "shape")}
    wanted = {param_path(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    where = f"checkpoint {self.directory}/{step}{self._recorded_task()}"
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

  def _recorded_task(self) -> str:
    """' (a 'TASK' run, per WORKDIR/config.json)' when the run that wrote this directory says so."""
    workdir = os.path.dirname(self.directory)
    task = recorded_config(workdir).get("task")
    return f" (a '{task}' run, per {os.path.join(workdir, 'config.json')})" if task else ""

  def restore(self, step: int, abstract_state):
    """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding)."""
    self.check_compatible(step, abstract_state)
    return self._restore(step, abstract_state)

  def _restore(self, step: int, abstract_state):
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    return self.manager.restore(step, args=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args))

  def restore_host(self, step: int):
    """The whole saved tree of `step` as numpy arrays, without a config (tools, init_from)."""
    meta = self.manager.item_metadata(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return jax.device_get(self._restore(step, abstract))

  def wait(self):
    with _SaveFailure(self, self._unconfirmed):
      self.manager.wait_until_finished()
    self._unconfirmed = None

  def close(self):
    self.wait()
    self.manager.close()


class _SaveFailure:
  """Turns an exception of a save into one UserError naming the step, the cause and the step kept."""

  def __init__(self, ckpt: Checkpointer, step):
    self.ckpt, self.step = ckpt, step

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if e is None or isinstance(e, (UserError, KeyboardInterrupt)) or not isinstance(e, Exception):
      return False
    good = [s for s in self.ckpt.finalized_steps() if s != self.step]
    kept = (f"the last good checkpoint, {self.ckpt.directory}/{good[-1]}, is kept" if good
            else "no earlier checkpoint exists")
    raise UserError(f"saving checkpoint {self.ckpt.directory}/{self.step} failed: {_reason(e)}; {kept}. "
                    f"Free disk space or fix the directory's permissions, then run the same command "
                    f"to resume.") from e


def _reason(e: Exception) -> str:
  """A short cause: 'no space left on device' for any form of ENOSPC, else the first line of the
  innermost cause (Orbax wraps TensorStore's error, which names the file, in one that dumps the
  whole TensorStore spec)."""
  chain = [e]
  while chain[-1].__cause__ is not None and len(chain) < 16:
    chain.append(chain[-1].__cause__)
  if any(getattr(x, "errno", None) == errno.ENOSPC or "No space left on device" in str(x) for x in chain):
    return "no space left on device"
  root = chain[-1]
  text = str(root).strip()
  first = text.splitlines()[0] if text else ""
  for tail in (". See full TensorStore details", " [tensorstore_spec="):
    first = first.split(tail)[0]
  return f"{type(root).__name__}: {first[:300]}"


_ABANDONED = ("reading array index", "OCDBT database", "Event loop is closed")


def _quiet_abandoned_reads() -> None:
  """Silences the echoes of a restore that failed. Orbax stops at the first unreadable array; its
  other reads of that step finish in the background and report their errors later, from other
  threads and at garbage collection: as unraisable exceptions (never-awaited read coroutines,
  'Event loop is closed') and as asyncio's 'exception was never retrieved' log records. Printed,
  they are thousands of lines of TensorStore specs after the one-line warning that already names
  the step and the cause. Only messages of that kind are dropped; the hooks stay for the process."""
  if getattr(sys.unraisablehook, "_vlm_jax_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not any(m in str(unraisable.exc_value) for m in _ABANDONED):
      previous(unraisable)
  hook._vlm_jax_quiet = True
  sys.unraisablehook = hook

  class _Filter(logging.Filter):
    def filter(self, record):
      msg = record.getMessage()
      return not ("exception was never retrieved" in msg and any(m in msg for m in _ABANDONED))
  logging.getLogger("asyncio").addFilter(_Filter())


def _warn(text: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {text}", file=sys.stderr, flush=True)


class WorkdirLock:
  """An exclusive lock on WORKDIR/.vlm_jax.lock for as long as a training run lives (taken by
  process 0). Two runs in one workdir (a command started twice, a job requeued while the old one
  still runs) would save the same steps over each other and interleave their metrics; the second
  is refused with one error naming the first. The kernel drops the lock when its holder exits,
  however it ends (SIGKILL too), so a crashed run never leaves a stale one behind."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir, self.enabled, self.file = workdir, enabled, None

  def __enter__(self):
    if not self.enabled:
      return self
    f = open(os.path.join(self.workdir, ".vlm_jax.lock"), "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise UserError(f"another training run is using workdir '{self.workdir}' ({holder}); two runs in one "
                      f"workdir would overwrite each other's checkpoints. Wait for it to end or stop it, or "
                      f"choose another --workdir.") from None
    except OSError:  # a filesystem without locks: run unguarded rather than not at all
      f.close()
      return self
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    self.file = f
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      fcntl.flock(self.file, fcntl.LOCK_UN)
      self.file.close()
      self.file = None


def recorded_config(workdir: str) -> dict:
  """WORKDIR/config.json as the last run there wrote it (a plain dict), or {} when it is missing or
  unreadable: for messages about what that run did, never for building anything."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return {}
  return d if isinstance(d, dict) else {}


def local_dir(path: str, flag: str) -> str:
  """The absolute form of a directory the user named with `flag`. A URL (gs://, s3://, ...) is
  refused: the workdir's files (metrics appended line by line, the lock, pictures) are written
  through the local file system, and os.path would have turned 'gs://b/run' into a local 'gs:/b/run'
  that trains and then fails at its first save."""
  if "://" in path:
    raise UserError(f"{flag} '{path}' is a URL; vlm_jax reads and writes it through the local file system. "
                    f"Mount the bucket and pass the mount path (e.g. `gcsfuse BUCKET /gcs/BUCKET` on every "
                    f"host, then {flag} /gcs/BUCKET/...), or use a shared file system (NFS, Filestore).")
  return os.path.abspath(os.path.expanduser(path))


def check_writable(*directories) -> None:
  """Raises UserError unless a file can be created in each existing directory (before training)."""
  for d in directories:
    if not os.path.isdir(d):
      continue
    probe = os.path.join(d, f".write_probe_{os.getpid()}")
    try:
      with open(probe, "w"):
        pass
      os.remove(probe)
    except OSError as e:
      raise UserError(f"'{d}' is not writable ({e.strerror}); checkpoints and metrics could not be saved. "
                      f"Fix its permissions or choose another --workdir.") from None


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _square(n: int) -> bool:
  return n > 0 and int(round(np.sqrt(n))) ** 2 == n


def _checkpoint_params(spec: str) -> dict:
  """{param path: numpy array} of a workdir's checkpoint; `spec` is 'WORKDIR' or 'WORKDIR:STEP'."""
  path, _, step = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
  directory = os.path.join(local_dir(path, "init_from"), "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"init_from='{spec}': '{directory}' does not exist. Point init_from at the workdir "
                    f"of an earlier run (optionally WORKDIR:STEP), or at a Hugging Face folder as 'hf:PATH'.")
  source = Checkpointer(directory, async_save=False)
  step = int(step) if step else source.latest_step()
  if step is None or step not in source.manager.all_steps():
    raise UserError(f"init_from='{spec}': no such checkpoint in {directory} "
                    f"(steps: {sorted(source.manager.all_steps()) or 'none'}).")
  saved = source.restore_host(step)
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
