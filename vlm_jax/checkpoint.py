"""Orbax checkpoints of the TrainState: async save, keep-N, restore onto any mesh, safe fallback.

Before restoring, the checkpoint's recorded tree is compared with the state this config builds;
a checkpoint of another model shape is refused with a message naming the first mismatching
parameter, and is never overwritten (training does not start). Resuming restores the whole state;
evaluation, prediction and export read the parameters alone (`restore_params`, a partial restore:
the optimizer state is never read).

Damage: a save killed midway stays as `STEP.orbax-checkpoint-tmp`, which Orbax never lists.
A finalized step whose files are damaged fails only when restored: `restore_latest` warns and
falls back to the next older step, and moves the damaged one aside to `STEP.damaged` (nothing
is deleted) so that the resumed run can save that step again. When no step restores, it is one
error naming the directory. Only damage (`_verdict`: missing, truncated, undecodable files) sets a
step aside, and only when every process found it damaged (`_agree`); a transient read error (a
gcsfuse or NFS hiccup, a timeout, memory) is retried after 1, 2 and 4 s, and what is neither
stops the run with one error, the same on every process, with nothing renamed. The reads a failed restore abandoned report their errors later, from
other threads; the fallback filters exactly those echoes out of the process's unraisable-exception
hook and asyncio logger (`_quiet_abandoned_reads`, the one process-wide change made here).
Orbax's keep-N deletes old steps only after the new one committed (also with async saves), so the
last good checkpoint survives a crash or a failed save; a failed save (disk full, permissions)
becomes one error naming the step and the step kept.
"""

import errno
import logging
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from vlm_jax.errors import UserError, exception_chain
from vlm_jax.optim import param_path
from vlm_jax.workdir import recorded_config

RETRY_DELAYS_S = (1.0, 2.0, 4.0)  # waits before the 2nd, 3rd and 4th read of a step after a transient error
ITEM = "default"  # the one item of each step (Orbax's name for a manager's single item)


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
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, retry_delays=None):
    self.directory = os.path.abspath(directory)
    self.retry_delays = tuple(RETRY_DELAYS_S if retry_delays is None else retry_delays)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    handler = self._handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())
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
    """(state, step) of the newest step that restores, or (None, None) for an empty directory.

    A transient read failure is retried after each of `retry_delays`; a step is set aside only when
    every process found it damaged. Anything else (a transient failure that outlasts the retries,
    an unclassified error, a failure on only some processes) is one UserError, the same on every
    process, and nothing is renamed."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      state, error = self._restore_with_retries(step, abstract_state)
      verdict = OK if error is None else _verdict(error)
      if error is not None:
        _quiet_abandoned_reads()
      verdicts = _agree(verdict)
      if (verdicts == OK).all():
        if failed:
          self._set_aside(failed)
          _warn(f"resuming from step {step}; the damaged step(s) {', '.join(map(str, failed))} were moved "
                f"to {self.directory}/STEP.damaged (nothing was deleted).")
        return state, step
      path = os.path.join(self.directory, str(step))
      where = f"checkpoint {path}"
      if (verdicts == DAMAGED).all():
        failed.append(step)
        _warn(f"{where} cannot be restored ({_reason(error)}); trying an older step.")
        continue
      if error is not None and len(verdicts) > 1:
        _warn(f"{where} failed on process {jax.process_index()}: {_reason(error)}", every_process=True)
      raise UserError(self._not_damage_message(path, verdicts, error))
    if failed:
      raise UserError(f"no checkpoint in {self.directory} can be restored (steps {', '.join(map(str, failed))} "
                      f"are damaged; nothing was deleted). Restore the directory from a backup, or move it "
                      f"away to start this run from scratch.")
    return None, None

  def _restore_with_retries(self, step: int, abstract_state):
    """(state, None), or (None, the exception) once an error is not transient or the retries ran out."""
    for attempt in range(len(self.retry_delays) + 1):
      try:
        return self.restore(step, abstract_state), None
      except UserError:
        raise
      except Exception as e:  # Orbax and TensorStore raise many types: `_verdict` sorts them
        if _verdict(e) != TRANSIENT or attempt == len(self.retry_delays):
          return None, e
        delay = self.retry_delays[attempt]
        _quiet_abandoned_reads()
        _warn(f"reading checkpoint {self.directory}/{step} failed ({_reason(e)}); retrying in {delay:g} s "
              f"(try {attempt + 2} of {len(self.retry_delays) + 1}).", every_process=True)
        time.sleep(delay)

  def _not_damage_message(self, path: str, verdicts, error) -> str:
    """The UserError text for a step that is not set aside; built only from `verdicts` when several
    processes took part, so that every process raises the same message."""
    where, kept = f"checkpoint {path}", "nothing was renamed or deleted"
    if len(verdicts) == 1:
      if verdicts[0] == TRANSIENT:
        return (f"{where} could not be read after {len(self.retry_delays) + 1} tries ({_reason(error)}); it "
                f"looks like a passing storage, network or memory fault, not damage: {kept}. Check the file "
                f"system (a gcsfuse or NFS mount) and the host's free memory, then run the same command again.")
      return (f"{where} could not be restored ({_reason(error)}); this is not an error that proves the files "
              f"damaged, so {kept}. Fix the cause and run the same command again; if the step is damaged, "
              f"move it aside (mv {path} {path}.damaged) to resume from the step before it.")
    bad = [i for i, v in enumerate(verdicts) if v != OK]
    kinds = sorted({_KIND[int(verdicts[i])] for i in bad})
    return (f"{where} could not be restored on process(es) {', '.join(map(str, bad))} of {len(verdicts)} "
            f"({', '.join(kinds)}; each of those processes printed its cause), and the processes do not all "
            f"find it damaged, so {kept}. Check that every host sees the same files there (the mount, "
            f"gcsfuse, NFS) and has free memory, then run the same command again.")

  def _set_aside(self, steps) -> None:
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, i = src + ".damaged", 1
        while os.path.exists(dst):
          dst, i = f"{src}.damaged{i}", i + 1
        os.rename(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("damaged checkpoints set aside")
    self.manager.reload()

  def check_compatible(self, step: int, abstract_state, part: str = None) -> None:
    """Raises UserError when the checkpoint's arrays (its `part` subtree, e.g. "params", if given)
    do not match `abstract_state` in path or shape."""
    meta = self.manager.item_metadata(step)
    saved = {param_path(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]
             if hasattr(m, "shape")}
    if part is not None:
      saved = {path: shape for path, shape in saved.items() if path.startswith(part + "/")}
      abstract_state = {part: abstract_state}
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

  def restore_params(self, step: int, abstract_params):
    """Only the `params` of the TrainState saved at `step`, onto the shardings of `abstract_params`:
    the optimizer state (Adam's moments: twice the parameters) is never read."""
    self.check_compatible(step, abstract_params, part="params")
    item = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    return self.manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))["params"]

  def _restore(self, step: int, abstract_state):
    """Reads `step` through the item handler. The manager's restore would end in a barrier of all
    processes, where a process whose peer failed to read would wait until the coordinator's timeout;
    `restore_latest` synchronizes in `_agree` instead, which every process reaches either way."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    item_dir = epath.Path(self.directory) / str(step) / ITEM
    return self._handler.restore(item_dir, args=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args))

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


OK, DAMAGED, TRANSIENT, UNKNOWN = 0, 1, 2, 3  # what one process found when it read a step
_KIND = {DAMAGED: "damaged files", TRANSIENT: "transient read errors", UNKNOWN: "an unclassified error"}
_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ECONNRESET, errno.ESTALE}
_TRANSIENT_CODES = ("DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED")
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "OUT_OF_RANGE")


def _verdict(e: Exception) -> int:
  """TRANSIENT, DAMAGED or UNKNOWN for a failed read of a step, judged along the exception chain.

  Transient (worth another try, never proof of damage): timeouts, EIO / ETIMEDOUT / EAGAIN /
  ECONNRESET / ESTALE (a gcsfuse or NFS mount), MemoryError, TensorStore's DEADLINE_EXCEEDED,
  UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED. Damage: a missing file, a file Orbax or TensorStore
  cannot decode (truncated, corrupt, a checksum): FileNotFoundError, EOFError, ValueError (which
  is also what JSON and Unicode decoding and TensorStore's DATA_LOSS, NOT_FOUND, FAILED_PRECONDITION
  ... raise). Anything else (a permission, a bug, a type a new Orbax raises) is UNKNOWN: it proves
  nothing about the files, and setting the newest step aside on a guess would resume the run from
  an older one, so it stops the run instead."""
  chain = exception_chain(e, limit=16)
  for x in chain:
    text = str(x)
    if (isinstance(x, (TimeoutError, MemoryError)) or getattr(x, "errno", None) in _TRANSIENT_ERRNOS
        or any(code in text for code in _TRANSIENT_CODES)):
      return TRANSIENT
  for x in chain:
    if (isinstance(x, (FileNotFoundError, EOFError, ValueError))
        or any(code in str(x) for code in _DAMAGE_CODES)):
      return DAMAGED
  return UNKNOWN


def _agree(local_verdict: int) -> np.ndarray:
  """Every process's verdict on one step (process i's at index i); the processes' meeting point."""
  if jax.process_count() == 1:
    return np.array([local_verdict])
  return np.asarray(multihost_utils.process_allgather(np.array([local_verdict], np.int32), tiled=True))


def _reason(e: Exception) -> str:
  """A short cause: 'no space left on device' for any form of ENOSPC, else the first line of the
  innermost cause (Orbax wraps TensorStore's error, which names the file, in one that dumps the
  whole TensorStore spec)."""
  chain = exception_chain(e, implicit=False, limit=16)
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


def _warn(text: str, every_process: bool = False) -> None:
  if every_process or jax.process_index() == 0:
    print(f"warning: {text}", file=sys.stderr, flush=True)
