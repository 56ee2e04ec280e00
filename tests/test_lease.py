"""The workdir guard where flock fails (gcsfuse, some NFS): a lease file that a second run respects,
that a dead holder's heartbeat lets expire, and that release removes. flock is made to fail with
ENOLCK here; a child process (flock failing there too) plays the other run."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from vlm_jax import lease as lease_lib, workdir as workdir_lib
from vlm_jax.errors import UserError

INTERVAL = 0.05


@pytest.fixture
def no_flock(monkeypatch):
  def flock(f, op):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(fcntl, "flock", flock)


def _lease(wd):
  return lease_lib.read(os.path.join(wd, workdir_lib.LEASE_FILE))


def _write_lease(wd, host, pid, age_s, expiry_s=90.0):
  with open(os.path.join(wd, workdir_lib.LEASE_FILE), "w") as f:
    json.dump({"host": host, "pid": pid, "heartbeat": time.time() - age_s, "expiry_s": expiry_s}, f)


def test_flock_is_the_guard_where_it_works(tmp_path, capsys):
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert not os.path.exists(tmp_path / workdir_lib.LEASE_FILE)
  assert capsys.readouterr().err == f"workdir guard: flock on {tmp_path}/.vlm_jax.lock\n"


def test_lease_is_written_renewed_and_removed(no_flock, tmp_path, capsys):
  wd = str(tmp_path)
  with workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL):
    first = _lease(wd)
    assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
    assert first["expiry_s"] == pytest.approx(3 * INTERVAL) and abs(first["heartbeat"] - time.time()) < 5
    time.sleep(10 * INTERVAL)
    assert _lease(wd)["heartbeat"] > first["heartbeat"]  # the heartbeat advances
  assert not os.path.exists(tmp_path / workdir_lib.LEASE_FILE)
  assert [n for n in os.listdir(wd) if "lease" in n] == []  # no temporary files left either
  assert capsys.readouterr().err == f"workdir guard: lease file {wd}/.vlm_jax.lease (flock unsupported here: ENOLCK)\n"


def test_a_fresh_lease_of_another_host_is_respected_and_an_expired_one_taken_over(no_flock, tmp_path):
  wd = str(tmp_path)
  _write_lease(wd, "other-host", 4242, age_s=10.0)
  with pytest.raises(UserError, match=rf"^another training run is using workdir '{wd}' \(pid 4242 on other-host, per "
                                      rf"its lease {wd}/.vlm_jax.lease, which expires in 80 s unless renewed\); two "
                                      r"runs in one workdir would overwrite each other's checkpoints\. Wait for it to "
                                      r"end or stop it, or choose another --workdir \(a dead run's lease expires by "
                                      r"itself\)\.$"):
    workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL).__enter__()
  assert _lease(wd)["pid"] == 4242  # untouched
  _write_lease(wd, "other-host", 4242, age_s=100.0)  # its last heartbeat is past the 90 s expiry
  with workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL):
    assert _lease(wd)["pid"] == os.getpid()
  assert _lease(wd) is None
  _write_lease(wd, "other-host", 4242, age_s=0.0, expiry_s=3 * INTERVAL)  # a holder that stops renewing
  with pytest.raises(UserError, match="pid 4242 on other-host"):
    workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL).__enter__()
  time.sleep(4 * INTERVAL)
  with workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL):
    assert _lease(wd)["pid"] == os.getpid()


def test_release_leaves_a_lease_another_run_took_over(no_flock, tmp_path, capsys):
  wd = str(tmp_path)
  with workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL):
    _write_lease(wd, "other-host", 4242, age_s=0.0)  # as if this run had stalled past its expiry
    time.sleep(4 * INTERVAL)
  assert _lease(wd)["pid"] == 4242
  assert "was taken over by pid 4242 on other-host" in capsys.readouterr().err


HOLDER = ("import errno, fcntl, os, sys, time; sys.path.insert(0, sys.argv[1])\n"
          "def flock(f, op): raise OSError(errno.ENOLCK, 'no locks')\n"
          "fcntl.flock = flock\n"
          "from vlm_jax.workdir import WorkdirLock\n"
          "WorkdirLock(sys.argv[2], lease_interval=float(sys.argv[3])).__enter__()\n"
          "print('leased', flush=True); time.sleep(60)")


def test_a_live_holder_refuses_the_second_run_and_its_lease_dies_with_it(no_flock, tmp_path):
  wd = str(tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, REPO, wd, "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
  try:
    assert holder.stdout.readline().strip() == "leased"
    time.sleep(1.0)  # several of its heartbeats: the lease stays fresh while it lives
    with pytest.raises(UserError, match=rf"pid {holder.pid} on {socket.gethostname()}, per its lease"):
      workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL).__enter__()
  finally:
    holder.kill()
    holder.wait()
  assert _lease(wd)["pid"] == holder.pid  # SIGKILL: nothing released it
  with workdir_lib.WorkdirLock(wd, lease_interval=INTERVAL):  # its pid is gone from this host: taken over
    assert _lease(wd)["pid"] == os.getpid()
