"""Preparing a tfds dataset so that a kill or a full disk never leaves a copy that looks valid.

tfds writes a dataset into `incomplete.XXXXXX_<version>/` next to its final folder and renames it
at the end; only the renamed folder (with its dataset_info.json and features.json) counts as
prepared. `prepare_once` adds what tfds leaves open: one build at a time per dataset (a file lock
that dies with its holder, SIGKILL included), the leftovers of killed builds removed before the
next one, and a write failure such as a full disk turned into one UserError.
"""

import contextlib
import errno
import fcntl
import logging
import os
import shutil

from vlm_jax.errors import UserError, exception_chain

log = logging.getLogger(__name__)

INCOMPLETE_PREFIX = "incomplete."  # tfds' constants.INCOMPLETE_PREFIX
LOCK_FILE = ".vlm_jax_build.lock"


def disk_full(exc: BaseException) -> bool:
  """Whether `exc` or an exception it was raised from is a full disk (OSError or TensorFlow's)."""
  return any((isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT))
             or "No space left on device" in str(x) or "Disk quota exceeded" in str(x)
             for x in exception_chain(exc))


def write_error(exc: BaseException, what: str, data_dir: str):
  """The UserError for a failed write of `what` into data_dir, or None when `exc` is not one."""
  if disk_full(exc):
    return UserError(f"no space left on the device of data_dir '{data_dir}' while preparing {what} "
                     f"(the partial copy was removed). Free space there or choose another "
                     f"--config.data_dir.")
  if isinstance(exc, PermissionError):
    return UserError(f"cannot prepare {what} into data_dir '{data_dir}': {exc}. Choose a writable "
                     f"--config.data_dir.")
  return None


@contextlib.contextmanager
def _build_lock(directory: str):
  """An exclusive flock on DIRECTORY/LOCK_FILE; yields its file descriptor."""
  os.makedirs(directory, exist_ok=True)
  fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"Waiting for another process that prepares {directory} ...", flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield fd
  finally:
    os.close(fd)


def remove_leftovers(data_path: str) -> None:
  """Removes the `incomplete.*_<version>` folders that killed builds of data_path left behind."""
  parent, version = os.path.split(os.path.normpath(data_path))
  for name in os.listdir(parent):
    if name.startswith(INCOMPLETE_PREFIX) and name.endswith("_" + version):
      log.info("removing %s, left by an interrupted build", os.path.join(parent, name))
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _prepared(builder) -> bool:
  # tfds warns about a variant folder that does not exist yet: ask only when there is one.
  return os.path.isdir(os.fspath(builder.data_path)) and builder.is_prepared()


def prepare_once(make_builder, build, what: str, data_dir: str):
  """`(builder, built)`: make_builder()'s dataset, prepared by `build(builder, lock_fd)` if needed.

  The lock is held while `build` runs (`lock_fd` lets a build subprocess hold it too); a build
  another process finished meanwhile is reused. Write failures become one UserError.
  """
  builder = make_builder()
  if _prepared(builder):
    return builder, False
  try:
    with _build_lock(os.path.dirname(os.fspath(builder.data_path))) as lock_fd:
      builder = make_builder()
      if _prepared(builder):
        return builder, False
      remove_leftovers(os.fspath(builder.data_path))
      build(builder, lock_fd)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  (only write failures are translated; the rest re-raised)
    err = write_error(e, what, data_dir)
    if err is None:
      raise
    raise err from None
  return make_builder(), True
