"""A lease file: one holder at a time where the file system has no working flock (gcsfuse, some NFS).

The file holds JSON `{host, pid, heartbeat, expiry_s}`. The holder's daemon thread rewrites it
(a temporary file, then `os.replace`) every `interval` seconds; the lease is fresh while
`heartbeat + expiry_s` lies ahead (`expiry_s` is 3 intervals), so a holder that died without
releasing it (SIGKILL, a lost host) blocks the workdir for at most that long, and not at all
when it died on this host (its pid is gone). Release removes the file if it is still ours.

A lease guards against a second run started while the first one lives. Unlike flock it is not
atomic against two runs started within the same instant on two hosts: the one whose write lands
second wins and the other is refused when it reads the file back.
"""

import json
import os
import socket
import sys
import threading
import time

from vlm_jax.data.tokenizer import write_atomic
from vlm_jax.errors import UserError

INTERVAL_S = 30.0  # heartbeat period; a lease expires 3 periods after its last heartbeat


class Lease:
  def __init__(self, path: str, what: str, interval: float = INTERVAL_S):
    self.path, self.what, self.interval = path, what, float(interval)
    self.me = {"host": socket.gethostname(), "pid": os.getpid()}
    self._stop, self._thread = threading.Event(), None

  def acquire(self) -> "Lease":
    """Takes the lease unless another live holder's is fresh; raises UserError naming that holder."""
    held = read(self.path)
    if held is not None and not self._ours(held) and _fresh(held):
      raise UserError(self._busy_message(held))
    self._write()
    held = read(self.path)
    if held is None or not self._ours(held):  # another run took it in the same instant
      raise UserError(self._busy_message(held or {}))
    self._thread = threading.Thread(target=self._beat, name="vlm_jax-lease", daemon=True)
    self._thread.start()
    return self

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    held = read(self.path)
    if held is not None and self._ours(held):
      os.remove(self.path)

  def _ours(self, held: dict) -> bool:
    return held.get("host") == self.me["host"] and held.get("pid") == self.me["pid"]

  def _write(self) -> None:
    write_atomic(self.path, json.dumps({**self.me, "heartbeat": time.time(), "expiry_s": 3 * self.interval}))

  def _beat(self) -> None:
    warned = False
    while not self._stop.wait(self.interval):
      held = read(self.path)
      if held is not None and not self._ours(held):
        print(f"warning: the lease {self.path} was taken over by pid {held.get('pid')} on {held.get('host')} "
              f"(this run's heartbeat came too late); this run no longer renews it.", file=sys.stderr, flush=True)
        return
      try:
        self._write()
      except OSError as e:  # a passing mount error: the next beat tries again within the expiry
        if not warned:
          print(f"warning: renewing the lease {self.path} failed ({e.strerror}); retrying every "
                f"{self.interval:g} s.", file=sys.stderr, flush=True)
          warned = True

  def _busy_message(self, held: dict) -> str:
    left = held.get("heartbeat", 0) + held.get("expiry_s", 0) - time.time()
    return (f"another training run is using workdir '{self.what}' (pid {held.get('pid')} on {held.get('host')}, "
            f"per its lease {self.path}, which expires in {max(left, 0):.0f} s unless renewed); two runs in one "
            f"workdir would overwrite each other's checkpoints. Wait for it to end or stop it, or choose another "
            f"--workdir (a dead run's lease expires by itself).")


def read(path: str):
  """The lease in `path` as a dict, or None when there is none (a cut-short file counts as none:
  the write that made it was not an `os.replace`, so it is no live holder's)."""
  try:
    with open(path) as f:
      held = json.load(f)
  except (OSError, ValueError):
    return None
  return held if isinstance(held, dict) else None


def _fresh(held: dict) -> bool:
  if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
    return False
  return time.time() < float(held.get("heartbeat", 0)) + float(held.get("expiry_s", 0))


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (OSError, TypeError, ValueError):  # someone else's process (EPERM), or no pid: assume alive
    return True
  return True
