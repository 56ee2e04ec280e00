"""The run's folder (WORKDIR): its lock, its path checks, and the files that describe the run.

WORKDIR holds `config.json` (the resolved config), `data_info.json` (the dataset facts, so that
evaluate/predict/export run without the dataset), `tokenizer.json` (for tasks with text: a
checkpoint travels with its tokenizer), `metrics.jsonl` (written by `reporting.MetricsWriter`;
lines past the checkpoint a run resumes from are trimmed here), `checkpoints/` (`checkpoint`)
and `.vlm_jax.lock` or, where flock fails, `.vlm_jax.lease` (one training run per workdir at a
time).
"""

import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys

from vlm_jax import config as config_lib, lease as lease_lib
from vlm_jax.data.sources import DataInfo
from vlm_jax.data.tokenizer import TOKENIZER_FILE, write_atomic
from vlm_jax.errors import UserError

CONFIG_FILE, DATA_INFO_FILE, METRICS_FILE = "config.json", "data_info.json", "metrics.jsonl"


LOCK_FILE, LEASE_FILE = ".vlm_jax.lock", ".vlm_jax.lease"


class WorkdirLock:
  """An exclusive lock on WORKDIR/.vlm_jax.lock for as long as a training run lives (taken by
  process 0). Two runs in one workdir (a command started twice, a job requeued while the old one
  still runs) would save the same steps over each other and interleave their metrics; the second
  is refused with one error naming the first. The kernel drops the lock when its holder exits,
  however it ends (SIGKILL too), so a crashed run never leaves a stale one behind.

  Where flock fails (gcsfuse, some NFS mounts), a lease file WORKDIR/.vlm_jax.lease guards the
  workdir instead (`lease.Lease`: a heartbeat every `lease_interval` seconds, expiry after three).
  One line on stderr says which guard is in use."""

  def __init__(self, workdir: str, enabled: bool = True, lease_interval: float = lease_lib.INTERVAL_S):
    self.workdir, self.enabled, self.lease_interval = workdir, enabled, lease_interval
    self.file = self.lease = None

  def __enter__(self):
    if not self.enabled:
      return self
    path = os.path.join(self.workdir, LOCK_FILE)
    f = open(path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise UserError(f"another training run is using workdir '{self.workdir}' ({holder}); two runs in one "
                      f"workdir would overwrite each other's checkpoints. Wait for it to end or stop it, or "
                      f"choose another --workdir.") from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: this file system has no working flock
      f.close()
      lease_path = os.path.join(self.workdir, LEASE_FILE)
      self.lease = lease_lib.Lease(lease_path, self.workdir, self.lease_interval).acquire()
      why = errno.errorcode.get(e.errno, str(e.errno))
      print(f"workdir guard: lease file {lease_path} (flock unsupported here: {why})", file=sys.stderr, flush=True)
      return self
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    self.file = f
    print(f"workdir guard: flock on {path}", file=sys.stderr, flush=True)
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      fcntl.flock(self.file, fcntl.LOCK_UN)
      self.file.close()
      self.file = None
    if self.lease is not None:
      self.lease.release()
      self.lease = None


def recorded_config(workdir: str) -> dict:
  """WORKDIR/config.json as the last run there wrote it (a plain dict), or {} when it is missing or
  unreadable: for messages about what that run did, never for building anything."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
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


def load_run_config(workdir: str):
  """The run's resolved config, pinned to what its checkpoint needs: the workdir's tokenizer.json
  (a tokenizer re-derived from changed data could map ids to other words), no init_from."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' is not a training workdir: it has no config.json. "
                    f"Pass the --workdir of a `python -m vlm_jax.train` run.")
  with open(path) as f:
    cfg = config_lib.from_json(f.read())
  with cfg.unlocked():
    if os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
      cfg.input.tokenizer = os.path.join(workdir, TOKENIZER_FILE)
    cfg.init_from = ""
  return cfg


def write_run_files(workdir: str, cfg, data_info: DataInfo, tokenizer=None) -> None:
  """Writes config.json, data_info.json and (for tasks with text) tokenizer.json of a run."""
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config_lib.to_json(cfg))
  with open(os.path.join(workdir, DATA_INFO_FILE), "w") as f:
    json.dump(dataclasses.asdict(data_info), f, indent=2)
  if tokenizer is not None:
    tokenizer.save(os.path.join(workdir, TOKENIZER_FILE))


def recorded_data_info(workdir: str):
  """The DataInfo the run in `workdir` recorded, or None when it has no data_info.json."""
  path = os.path.join(workdir, DATA_INFO_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return DataInfo(**json.load(f))


def note_changed_input(workdir: str, cfg, start: int) -> None:
  """A resumed run whose batch size or seed differs from the run that saved the checkpoint is
  allowed (another slice, another per-device batch), but its input no longer continues where that
  run stopped: the position is step x batch_size, the order comes from the seed. Says so."""
  before = recorded_config(workdir)
  old_batch, old_seed = before.get("batch_size"), before.get("seed")
  if old_batch not in (None, cfg.batch_size):
    print(f"note: batch_size is {cfg.batch_size}, the run that saved step {start} used {old_batch}: the input "
          f"resumes at example {start * cfg.batch_size} of the shuffled stream, not at {start * old_batch} "
          f"where it stopped (the learning-rate schedule counts steps).", file=sys.stderr, flush=True)
  if old_seed not in (None, cfg.seed):
    print(f"note: seed is {cfg.seed}, the run that saved step {start} used {old_seed}: the input after "
          f"step {start} is shuffled and augmented in another order.", file=sys.stderr, flush=True)


def trim_metrics(workdir: str, last_step: int) -> None:
  """Drops metrics logged after `last_step` (they are recomputed identically on resume), and a
  last line cut short by a killed run."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    text = f.read()
  lines = text.splitlines()
  if lines and not text.endswith("\n"):
    lines.pop()  # cut short by a kill; its step is recomputed
  keep = "".join(x + "\n" for x in lines if x.strip() and json.loads(x)["step"] <= last_step)
  if keep != text:
    write_atomic(path, keep)


def create(path: str) -> str:
  """The absolute path of the training workdir `path`, created if needed and checked writable."""
  workdir = local_dir(path, "--workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create workdir '{workdir}': {e.strerror}. Choose a writable --workdir.") from None
  check_writable(workdir, os.path.join(workdir, "checkpoints"))
  return workdir
