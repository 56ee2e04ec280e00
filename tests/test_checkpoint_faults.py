"""Failed reads while resuming (`Checkpointer.restore_latest`): transient errors are retried and
never set a step aside, real damage is, and only when every process agrees; the rest is one error
with nothing renamed. Two processes for real at the end (one of them cannot read)."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO

from vlm_jax import checkpoint
from vlm_jax.errors import UserError

DELAYS = (0.01, 0.02, 0.04)


def _tree(step):
  return {"w": np.arange(12, dtype=np.float32).reshape(3, 4) * step, "b": np.full((5,), step, np.int32)}


def _abstract():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in _tree(1).items()}


@pytest.fixture
def ck(tmp_path):
  """A checkpoint directory with steps 1 and 2, and a Checkpointer on it with tiny retry delays."""
  d = str(tmp_path / "checkpoints")
  writer = checkpoint.Checkpointer(d, async_save=False)
  for step in (1, 2):
    writer.save(step, _tree(step))
  writer.close()
  c = checkpoint.Checkpointer(d, async_save=False, retry_delays=DELAYS)
  yield c
  c.close()


def _failing_reads(monkeypatch, errors):
  """The item handler's reads raise `errors` in turn (then read for real); returns the steps read."""
  real, reads, pending = ocp.PyTreeCheckpointHandler.restore, [], list(errors)

  def restore(self, directory, *args, **kwargs):
    reads.append(int(directory.parent.name))
    if pending:
      raise pending.pop(0)
    return real(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", restore)
  return reads


def _wrapped(inner, outer="Error reading array"):
  """`outer` raised from `inner`, as Orbax wraps TensorStore's errors."""
  try:
    try:
      raise inner
    except BaseException as e:
      raise ValueError(outer) from e
  except ValueError as e:
    return e


def test_failed_reads_are_sorted_into_transient_damage_and_unknown():
  def decode_error():
    try:
      json.loads("{trunc")
    except ValueError as e:
      return e
  T, D, U = checkpoint.TRANSIENT, checkpoint.DAMAGED, checkpoint.UNKNOWN
  cases = [
      (OSError(errno.EIO, "Input/output error"), T), (OSError(errno.ESTALE, "Stale file handle"), T),
      (OSError(errno.ETIMEDOUT, "timed out"), T), (ConnectionResetError(errno.ECONNRESET, "reset"), T),
      (TimeoutError("read"), T), (MemoryError(), T),
      (ValueError('DEADLINE_EXCEEDED: Error reading "params.w/0" from gs://b/x'), T),
      (ValueError("UNAVAILABLE: gcs"), T), (ValueError("RESOURCE_EXHAUSTED: out of memory"), T),
      (_wrapped(OSError(errno.EAGAIN, "try again")), T),  # found along the chain
      (FileNotFoundError(errno.ENOENT, "No such file", "manifest.ocdbt"), D),
      (ValueError('DATA_LOSS: Error reading "params.w/0": checksum mismatch'), D),
      (ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream"), D), (decode_error(), D),
      (EOFError(), D), (_wrapped(FileNotFoundError(errno.ENOENT, "gone")), D),
      (PermissionError(errno.EACCES, "Permission denied"), U), (KeyError("params"), U), (RuntimeError("bug"), U),
  ]
  assert [checkpoint._verdict(e) for e, _ in cases] == [v for _, v in cases]


def test_transient_errors_are_retried_and_the_newest_step_restores(ck, monkeypatch, capsys):
  before = sorted(os.listdir(ck.directory))
  reads = _failing_reads(monkeypatch, [OSError(errno.EIO, "Input/output error"),
                                       _wrapped(ValueError("UNAVAILABLE: connection to gcsfuse lost"))])
  state, step = ck.restore_latest(_abstract())
  assert step == 2 and reads == [2, 2, 2]
  assert all(np.array_equal(np.asarray(state[k]), v) for k, v in _tree(2).items())
  assert sorted(os.listdir(ck.directory)) == before == ["1", "2"]
  err = capsys.readouterr().err
  assert (f"warning: reading checkpoint {ck.directory}/2 failed (OSError: [Errno 5] Input/output error); "
          f"retrying in 0.01 s (try 2 of 4).") in err
  assert "failed (ValueError: UNAVAILABLE: connection to gcsfuse lost); retrying in 0.02 s (try 3 of 4)." in err
  assert "damaged" not in err


def test_transient_errors_that_persist_are_one_error_and_nothing_is_renamed(ck, monkeypatch):
  reads = _failing_reads(monkeypatch, [TimeoutError("read timed out")] * 10)
  with pytest.raises(UserError, match=rf"^checkpoint {ck.directory}/2 could not be read after 4 tries "
                                      r"\(TimeoutError: read timed out\); it looks like a passing storage, network "
                                      r"or memory fault, not damage: nothing was renamed or deleted\. Check the "
                                      r"file system .* then run the same command again\.$"):
    ck.restore_latest(_abstract())
  assert reads == [2, 2, 2, 2] and sorted(os.listdir(ck.directory)) == ["1", "2"]


def test_an_unclassified_error_is_not_taken_for_damage(ck, monkeypatch):
  reads = _failing_reads(monkeypatch, [PermissionError(errno.EACCES, "Permission denied")])
  path = f"{ck.directory}/2"
  with pytest.raises(UserError, match=rf"^checkpoint {path} could not be restored \(PermissionError: \[Errno 13\] "
                                      rf"Permission denied\); this is not an error that proves the files damaged, "
                                      rf"so nothing was renamed or deleted\. .* \(mv {path} {path}\.damaged\)"):
    ck.restore_latest(_abstract())
  assert reads == [2] and sorted(os.listdir(ck.directory)) == ["1", "2"]  # not retried


def _truncate_data(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if f"{os.sep}d{os.sep}" in os.path.join(r, f)]
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


def test_real_damage_sets_the_step_aside_without_retrying(ck, monkeypatch, capsys):
  _truncate_data(os.path.join(ck.directory, "2"))
  tries, real = [], checkpoint.Checkpointer.restore
  monkeypatch.setattr(checkpoint.Checkpointer, "restore", lambda self, step, a: (tries.append(step), real(self, step, a))[1])
  state, step = ck.restore_latest(_abstract())
  assert step == 1 and tries == [2, 1]
  assert all(np.array_equal(np.asarray(state[k]), v) for k, v in _tree(1).items())
  assert sorted(os.listdir(ck.directory)) == ["1", "2.damaged"]
  err = capsys.readouterr().err
  assert f"warning: checkpoint {ck.directory}/2 cannot be restored (ValueError: " in err and "retrying" not in err


def _as_process(monkeypatch, index, verdicts):
  """This process plays process `index` of len(verdicts); the others' verdicts on every step are
  `verdicts` (this process's own entry is replaced by what it found)."""
  seen = []

  def agree(local):
    seen.append(local)
    out = np.array(verdicts)
    out[index] = local
    return out
  monkeypatch.setattr(checkpoint, "_agree", agree)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  return seen


def test_a_step_only_some_processes_cannot_read_is_the_same_error_everywhere(ck, monkeypatch, capsys):
  """Process 1 cannot read step 2 (transient, persisting), process 0 can: both raise one message,
  built from the gathered verdicts alone, and nothing is renamed."""
  T = checkpoint.TRANSIENT
  messages = []
  seen = _as_process(monkeypatch, 0, [checkpoint.OK, T])  # process 0: read fine, its peer did not
  with pytest.raises(UserError) as e0:
    ck.restore_latest(_abstract())
  messages.append(str(e0.value))
  assert seen == [checkpoint.OK]
  _failing_reads(monkeypatch, [OSError(errno.EIO, "Input/output error")] * 10)
  seen = _as_process(monkeypatch, 1, [checkpoint.OK, T])  # process 1: its reads fail
  with pytest.raises(UserError) as e1:
    ck.restore_latest(_abstract())
  messages.append(str(e1.value))
  assert seen == [T]
  assert messages[0] == messages[1] == (
      f"checkpoint {ck.directory}/2 could not be restored on process(es) 1 of 2 (transient read errors; each "
      f"of those processes printed its cause), and the processes do not all find it damaged, so nothing was "
      f"renamed or deleted. Check that every host sees the same files there (the mount, gcsfuse, NFS) and has "
      f"free memory, then run the same command again.")
  assert f"warning: checkpoint {ck.directory}/2 failed on process 1: OSError: [Errno 5]" in capsys.readouterr().err
  assert sorted(os.listdir(ck.directory)) == ["1", "2"]


def test_damage_seen_by_one_process_only_is_not_set_aside(ck, monkeypatch):
  _truncate_data(os.path.join(ck.directory, "2"))
  _as_process(monkeypatch, 0, [checkpoint.OK, checkpoint.OK])  # the peer read its part of step 2
  with pytest.raises(UserError, match=rf"checkpoint {ck.directory}/2 could not be restored on process\(es\) 0 of 2 "
                                      r"\(damaged files; .*nothing was renamed or deleted"):
    ck.restore_latest(_abstract())
  assert sorted(os.listdir(ck.directory)) == ["1", "2"]


def test_damage_every_process_agrees_on_is_set_aside(ck, monkeypatch):
  """Process 0 of 2: its peer also finds step 2 damaged, then reads step 1."""
  _truncate_data(os.path.join(ck.directory, "2"))
  peer, seen = iter([checkpoint.DAMAGED, checkpoint.OK]), []

  def agree(local):
    seen.append(local)
    return np.array([local, next(peer)])
  monkeypatch.setattr(checkpoint, "_agree", agree)
  state, step = ck.restore_latest(_abstract())
  assert step == 1 and seen == [checkpoint.DAMAGED, checkpoint.OK]
  assert sorted(os.listdir(ck.directory)) == ["1", "2.damaged"]


CHILD = textwrap.dedent("""
    import errno, os, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    port, pid, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    import numpy as np
    import orbax.checkpoint as ocp
    from vlm_jax import checkpoint
    from vlm_jax.errors import run_cli
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    value = np.arange(6, dtype=np.float32)
    state = {"w": jax.make_array_from_callback(value.shape, rep, lambda idx: value[idx])}
    ck = checkpoint.Checkpointer(d, async_save=False, retry_delays=(0.05, 0.05))
    ck.save(1, state)
    ck.wait()
    if pid == 1:  # this host's mount fails every read
      def restore(self, directory, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(directory))
      ocp.PyTreeCheckpointHandler.restore = restore
    abstract = {"w": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=rep)}
    sys.exit(run_cli(lambda: ck.restore_latest(abstract)))
""")


def test_two_processes_one_cannot_read_both_stop_with_the_same_message(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  d = str(tmp_path / "checkpoints")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "JAX_NUM_CPU_DEVICES": "1"}
  procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(port), str(i), d], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=120)[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  errors = [[line for line in err.splitlines() if line.startswith("error: ")] for err in outs]
  assert [p.returncode for p in procs] == [2, 2], outs
  assert errors[0] == errors[1] and len(errors[0]) == 1, outs
  assert errors[0][0].startswith(f"error: checkpoint {d}/1 could not be restored on process(es) 1 of 2 "
                                 f"(transient read errors;")
  assert "failed on process 1: OSError: [Errno 5] Input/output error" in outs[1]
  assert sorted(os.listdir(d)) == ["1"]
