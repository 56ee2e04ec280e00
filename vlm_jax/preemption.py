"""Graceful stop on SIGTERM / SIGINT: the train loop finishes its step, checkpoints and exits 0.

Cloud TPU and SLURM announce preemption with SIGTERM; Ctrl-C sends SIGINT. `StopSignal` turns
the first of either into a request that the loop polls once per step (`requested(step)`);
a second signal gets the default behaviour, so a user who presses Ctrl-C twice still stops
at once.

Every process must stop at the same step, or the collectives of the last step and of the
checkpoint would hang. One process costs nothing: the handler sets a flag. Several processes
(jax.distributed) use JAX's preemption service: its own SIGTERM notifier tells the
coordinator, which picks the step all processes reach (`reached_preemption_sync_point`);
SIGINT is forwarded to the process as SIGTERM so it takes the same route. Without that
service a flag is all-gathered every step (a small collective).
"""

import os
import signal
import threading

import jax
import numpy as np
from jax._src import distributed
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Context manager: installs the handlers in the main thread and restores the old ones on exit."""

  def __init__(self):
    self.received = None  # name of the first signal, e.g. 'SIGTERM'
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts at once
    if signum == signal.SIGINT and jax.process_count() > 1 and _sync_manager() is not None:
      os.kill(os.getpid(), signal.SIGTERM)  # let JAX's preemption notifier agree on the step

  def requested(self, step: int) -> bool:
    """True on every process at the same step once any process got a signal. Call every step."""
    if jax.process_count() == 1:
      return self.received is not None
    if _sync_manager() is not None:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or "SIGTERM"
        return True
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if np.asarray(flags).any():
      self.received = self.received or "a signal on another process"
      return True
    return False


def _sync_manager():
  return distributed.global_state.preemption_sync_manager
