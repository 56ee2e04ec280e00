"""Faults a long run meets, in-process: damaged checkpoints, a full disk during a save, a
read-only workdir, a checkpoint of another task, NaN batches (skip / stop), SIGINT.

Every run is the tiny recipe at 3 steps, so after the first one the persistent compilation
cache (on for this module only) serves the compiled init and train steps.
"""

import errno
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from etils import epath

from vlm_jax import checkpoint, config, preemption, reporting, train, workdir as workdir_lib
from vlm_jax.data import pipeline
from vlm_jax.errors import UserError
from vlm_jax.runtime import build, restore_run


STEPS = 3


def _short(cfg, steps=STEPS, keep=3):
  cfg.total_steps, cfg.checkpoint_every_steps, cfg.keep_checkpoints = steps, 1, keep
  cfg.log_every_steps, cfg.eval_every_steps, cfg.evals.splits = 1, 1000, ""
  return cfg


def _restore(workdir, step):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  state = ckpt.restore_host(step)
  ckpt.close()
  return state


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _listing(d):
  return sorted((os.path.relpath(os.path.join(r, f), d), os.path.getsize(os.path.join(r, f)))
                for r, _, fs in os.walk(d) for f in fs)


def _data_files(step_dir):
  """The array data files of one step (the largest first)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
  return sorted(files, key=os.path.getsize, reverse=True)


@pytest.fixture(scope="module")
def three_steps(data_dir, tmp_path_factory):
  """A finished tiny run with committed checkpoints 1, 2, 3 (copy it before damaging)."""
  cfg = _short(config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny")))
  cfg.data_dir = data_dir
  wd = str(tmp_path_factory.mktemp("three") / "run")
  train.train(cfg, wd)
  return cfg, wd


def test_damaged_latest_steps_fall_back_and_are_set_aside(three_steps, tmp_path, capsys):
  cfg, good = three_steps
  wd = str(tmp_path / "run")
  shutil.copytree(good, wd)
  ck = os.path.join(wd, "checkpoints")
  for f in _data_files(os.path.join(ck, "3")):  # step 3: truncated array data
    os.truncate(f, os.path.getsize(f) // 2)
  os.remove(os.path.join(ck, "2", "default", "manifest.ocdbt"))  # step 2: a file missing
  train.train(cfg, wd)  # same total_steps: the learning-rate schedule depends on it
  err = capsys.readouterr().err
  assert f"warning: checkpoint {ck}/3 cannot be restored (ValueError: " in err  # TensorStore's cause,
  assert f"warning: checkpoint {ck}/2 cannot be restored (ValueError: " in err  # not Orbax's wrapper
  assert "TensorStore details" not in err and "tensorstore_spec" not in err and "Traceback" not in err
  assert "resuming from step 1; the damaged step(s) 3, 2 were moved" in err
  assert sorted(os.listdir(ck)) == ["1", "2", "2.damaged", "3", "3.damaged"]
  # Steps 2 and 3 were recomputed from step 1 exactly as the undamaged run computed them.
  assert _equal(_restore(wd, 3), _restore(good, 3))
  steps = [r["step"] for r in reporting.read_metrics(wd) if "train/loss" in r]
  assert steps == [1, 2, 3]


def test_one_process_saves_a_replicated_state_without_compiling(tmp_path):
  """Replica-parallel saving would trace and compile a slicing program per array shape here."""
  mesh = jax.make_mesh((8,), ("data",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  state = {f"w{i}": jax.device_put(rng.normal(size=(40 + i, 24)).astype(np.float32), rep) for i in range(6)}
  traced = []
  listen = lambda event, secs, **kw: traced.append(event) if event.endswith("jaxpr_trace_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listen)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"))
  try:
    ckpt.save(1, state)
    ckpt.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert traced == []
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  restored = ckpt.restore(1, abstract)
  ckpt.close()
  assert _equal(restored, state) and all(r.sharding == rep for r in jax.tree.leaves(restored))


def test_echoes_of_a_failed_restore_are_dropped_and_nothing_else(monkeypatch, caplog):
  """After a failed restore, Orbax's abandoned reads report their errors later (unraisable
  exceptions, asyncio log records): thousands of lines after the one-line warning. Only those go."""
  import logging
  import types
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint._quiet_abandoned_reads()
  checkpoint._quiet_abandoned_reads()  # once per process: a second call adds nothing
  echo = types.SimpleNamespace(exc_value=Exception("Encountered error while reading array index: (slice(0, 2, 1),)"))
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=KeyError("something else"))
  for u in (echo, closed, other):
    sys.unraisablehook(u)
  assert seen == [other]
  log = logging.getLogger("asyncio")
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    log.error("Future exception was never retrieved\nfuture: <Future exception=ValueError('Error reading "
              "\"params.x/0\" in OCDBT database at local file ...')>")
    log.error("Future exception was never retrieved\nfuture: <Future exception=OSError('disk')>")
  assert [r.getMessage().count("OSError") for r in caplog.records] == [1]


def test_second_run_in_a_busy_workdir_is_refused_and_the_lock_dies_with_its_holder(tiny_config, tmp_path):
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  with workdir_lib.WorkdirLock(wd):  # as a first run holds it while it trains
    with pytest.raises(UserError, match=rf"another training run is using workdir '{wd}' \(pid {os.getpid()} on "
                                        rf".*\); two runs in one workdir would overwrite .* choose another --workdir"):
      train.train(tiny_config, wd)
  assert os.listdir(wd) == [".vlm_jax.lock"]  # refused before anything was built or written
  # A holder killed with SIGKILL leaves no stale lock: the kernel drops it with the process.
  holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                             "from vlm_jax.workdir import WorkdirLock; import time; "
                             "l = WorkdirLock(sys.argv[2]).__enter__(); print('locked', flush=True); time.sleep(60)",
                             REPO, wd], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(UserError, match=rf"pid {holder.pid} on "):
    workdir_lib.WorkdirLock(wd).__enter__()
  holder.kill()
  holder.wait()
  with workdir_lib.WorkdirLock(wd):
    pass


def test_no_restorable_step_is_one_error_and_nothing_is_deleted(three_steps, tmp_path):
  cfg, good = three_steps
  wd = str(tmp_path / "run")
  shutil.copytree(good, wd)
  ck = os.path.join(wd, "checkpoints")
  for step in ("1", "2", "3"):  # every data file: which single file a step cannot do without varies run to run
    for f in _data_files(os.path.join(ck, step)):
      os.remove(f)
  before = _listing(ck)
  with pytest.raises(UserError, match=rf"no checkpoint in {ck} can be restored \(steps 3, 2, 1 are damaged; "
                                      r"nothing was deleted\)"):
    train.train(cfg, wd)
  assert _listing(ck) == before


def test_unfinished_save_is_ignored(three_steps, tmp_path, capsys):
  cfg, good = three_steps
  wd = str(tmp_path / "run")
  shutil.copytree(good, wd)
  ck = os.path.join(wd, "checkpoints")
  os.rename(os.path.join(ck, "3"), os.path.join(ck, "3.orbax-checkpoint-tmp"))  # as a kill mid-save leaves it
  train.train(cfg, wd)
  out = capsys.readouterr()
  assert f"Resuming from {ck}/2" in out.out and "warning" not in out.err
  assert _equal(_restore(wd, 3), _restore(good, 3))


def test_restore_run_reads_only_the_params_onto_their_shardings(three_steps, monkeypatch):
  """evaluate / predict / export read a step's parameters; the optimizer state stays on disk."""
  _, wd = three_steps
  read = []
  real = ocp.CheckpointManager.restore

  def spy(self, step, *args, **kwargs):
    read.append(real(self, step, *args, **kwargs))
    return read[-1]
  monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
  s, params, step = restore_run(wd)
  assert step == 3 and [list(r) for r in read] == [["params"]]
  monkeypatch.undo()
  assert _equal(params, _restore(wd, 3)["params"])
  shardings = jax.tree.leaves(s.state_sharding.params)
  assert [a.sharding for a in jax.tree.leaves(params)] == shardings and len(shardings) > 5


def test_restore_run_refuses_params_of_another_shape_by_name(three_steps, tmp_path):
  _, good = three_steps
  wd = str(tmp_path / "run")
  shutil.copytree(good, wd)
  before = _listing(wd)
  with pytest.raises(UserError, match=rf"checkpoint {wd}/checkpoints/3 \(a 'classification' run, per "
                                      rf"{wd}/config.json\) belongs to a different model shape: "
                                      r"'params/.*' is \(.*\) there but \(.*\) in this config"):
    restore_run(wd, edit=lambda cfg: setattr(cfg.model, "mlp_dim", cfg.model.mlp_dim * 2))
  assert _listing(wd) == before


def test_restore_run_reads_the_newest_committed_step_while_one_is_being_written(three_steps, tmp_path):
  """Train saves step 4 (`4.orbax-checkpoint-tmp` until Orbax renames it) while evaluate, predict or
  export starts: they get step 3, whole, and leave the save in flight untouched."""
  _, good = three_steps
  wd = str(tmp_path / "run")
  shutil.copytree(good, wd)
  ck = os.path.join(wd, "checkpoints")
  in_flight = os.path.join(ck, "4.orbax-checkpoint-tmp")
  shutil.copytree(os.path.join(ck, "3"), in_flight)
  for f in _data_files(in_flight):  # half written
    os.truncate(f, os.path.getsize(f) // 2)
  before = _listing(in_flight)
  _, params, step = restore_run(wd)
  assert step == 3 and _equal(params, _restore(good, 3)["params"])
  assert _listing(in_flight) == before
  with pytest.raises(UserError, match=rf"no checkpoint at step 4 in {ck} \(steps: \[1, 2, 3\]\)"):
    restore_run(wd, step=4)


def test_disk_full_during_async_save_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  """ENOSPC from a write of step 2's save: one error naming step 2; step 1 (keep=1) survives."""
  wd = str(tmp_path / "run")
  write_text = epath.Path.write_text

  def full_disk(self, *args, **kwargs):
    if f"{os.sep}2.orbax-checkpoint-tmp" in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)
  monkeypatch.setattr(epath.Path, "write_text", full_disk)
  ck = os.path.join(wd, "checkpoints")
  with pytest.raises(UserError, match=rf"saving checkpoint {ck}/2 failed: no space left on device; the last "
                                      rf"good checkpoint, {ck}/1, is kept\. Free disk space"):
    train.train(_short(tiny_config, keep=1), wd)
  monkeypatch.undo()
  assert "1" in os.listdir(ck) and "2" not in os.listdir(ck)
  assert int(_restore(wd, 1)["step"]) == 1


def _make_read_only(path):
  """chmod 555, and (for root, whom modes do not stop) the immutable attribute. Returns the undo
  function, or None (everything undone) when the directory stays writable."""
  def undo():
    os.system(f"chattr -i '{path}' 2>/dev/null")
    os.chmod(path, 0o755)
  os.chmod(path, 0o555)
  if os.geteuid() == 0:
    os.system(f"chattr +i '{path}' 2>/dev/null")
  try:
    open(os.path.join(path, "probe"), "w").close()
  except OSError:
    return undo
  os.remove(os.path.join(path, "probe"))
  undo()
  return None


@pytest.mark.parametrize("which", ["workdir", "checkpoints"])
def test_read_only_workdir_fails_before_training(tiny_config, tmp_path, which):
  wd = tmp_path / "run"
  target = wd / "checkpoints" if which == "checkpoints" else wd
  target.mkdir(parents=True)
  undo = _make_read_only(str(target))
  if undo is None:
    pytest.skip("cannot make a directory read-only here")
  try:
    with pytest.raises(UserError, match=rf"'{target}' is not writable \(.*\); checkpoints and metrics could not "
                                        r"be saved\. Fix its permissions or choose another --workdir\."):
      train.train(_short(tiny_config), str(wd))
  finally:
    undo()
  assert not os.path.exists(wd / "metrics.jsonl")


def test_checkpoint_of_another_task_is_refused_by_name(tiny_config, data_dir, tmp_path):
  """A captioning run's checkpoint in a classification run: refused, naming a parameter, untouched."""
  cap = config.load(os.path.join(REPO, "configs/cappa_shapes.py:tiny"))
  cap.data_dir = data_dir
  s = build(cap)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), s.abstract_state))
  ckpt.close()
  before = _listing(str(tmp_path / "checkpoints"))
  with open(tmp_path / "config.json", "w") as f:
    f.write(config.to_json(cap))  # as the captioning run left it
  with pytest.raises(UserError, match=rf"checkpoint {tmp_path}/checkpoints/1 \(a 'captioning' run, per "
                                      rf"{tmp_path}/config.json\) belongs to a different model: it has no "
                                      r"parameter 'params/embedding/bias'\. Use a new --workdir"):
    train.train(_short(tiny_config), str(tmp_path))
  assert _listing(str(tmp_path / "checkpoints")) == before


def _at_step(monkeypatch, step, action):
  """Wraps pipeline.train_batches: `action(batch)` runs when the batch of `step` is drawn and
  returns the batch to use."""
  real = pipeline.train_batches

  def batches(*args, **kwargs):
    start = args[4] if len(args) > 4 else kwargs.get("start_step", 0)
    for i, batch in enumerate(real(*args, **kwargs), start + 1):
      yield action(batch) if i == step else batch
  monkeypatch.setattr(pipeline, "train_batches", batches)


def _nan_pixels(batch):
  return {**batch, "image": np.full_like(batch["image"], np.nan)}


def test_nan_batch_is_skipped_and_counted(tiny_config, tmp_path, monkeypatch):
  _at_step(monkeypatch, 2, _nan_pixels)
  wd = str(tmp_path)
  cfg = _short(tiny_config)
  train.train(cfg, wd)
  rows = {r["step"]: r for r in reporting.read_metrics(wd) if "train/loss" in r}
  assert [rows[i]["train/skipped_steps"] for i in (1, 2, 3)] == [0, 1, 0]
  assert np.isnan(rows[2]["train/loss"]) and np.isfinite(rows[3]["train/loss"])
  s1, s2, s3 = (_restore(wd, i) for i in (1, 2, 3))
  assert int(s2["step"]) == 2  # the batch is consumed, not retried
  assert _equal(s2["params"], s1["params"]) and _equal(s2["opt_state"], s1["opt_state"])
  assert not _equal(s3["params"], s2["params"])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(s3["params"]))


def test_nan_batch_with_stop_policy_saves_last_good_state_and_fails(tiny_config, tmp_path, monkeypatch):
  _at_step(monkeypatch, 3, _nan_pixels)
  wd = str(tmp_path)
  cfg = _short(tiny_config)
  cfg.checkpoint_every_steps = 10
  cfg.nan_policy = "stop"
  with pytest.raises(UserError, match=rf"step 3: the loss or gradient norm is not finite \(nan_policy='stop'\); "
                                      rf"the last good state is saved as {wd}/checkpoints/2\."):
    train.train(cfg, wd)
  ckpt = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"))
  assert ckpt.manager.all_steps() == [2]
  ckpt.close()
  state = _restore(wd, 2)
  assert int(state["step"]) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_nan_policy_is_validated(tiny_config):
  tiny_config.nan_policy = "ignore"
  with pytest.raises(UserError, match="config: nan_policy must be one of skip, stop, got 'ignore'"):
    config.validate(tiny_config)


def test_sigint_stops_after_the_step_with_a_committed_checkpoint(tiny_config, tmp_path, monkeypatch, capsys):
  """A real SIGINT to this process while step 2's batch is drawn: the run finishes step 2,
  saves it (not a regular checkpoint step), and returns normally."""
  wd = str(tmp_path)
  cfg = _short(tiny_config)
  cfg.checkpoint_every_steps = 10
  _at_step(monkeypatch, 2, lambda batch: (os.kill(os.getpid(), signal.SIGINT), batch)[1])
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopSignal() as stop:
    train.train(cfg, wd, stop)
  assert signal.getsignal(signal.SIGINT) is before
  out = capsys.readouterr().out
  assert (f"Stopped by SIGINT after step 2: checkpoint {wd}/checkpoints/2 is saved; run the same command "
          f"to resume.\n") in out
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2"]
  assert int(_restore(wd, 2)["step"]) == 2
  assert [r["step"] for r in reporting.read_metrics(wd)] == [1, 2]
