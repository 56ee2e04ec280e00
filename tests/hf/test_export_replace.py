"""`--overwrite` replaces an export only once the new one is whole: a SIGKILL while the new one is
written or right after it is swapped in leaves a complete export at --out (the old, then the new),
and the next export removes the hidden folders the killed ones left."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from vlm_jax import config, train
from vlm_jax.hf import export, files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _folder(path, text):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(text)


def _text(path):
  with open(os.path.join(path, "config.json")) as f:
    return f.read()


def _hidden(parent):
  return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_put_in_place_replaces_the_old_export_and_removes_leftovers(tmp_path, monkeypatch, capsys, exchange):
  if not exchange:
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
  out = str(tmp_path / "hf")
  _folder(out, "old")
  for name in (".hf-export-hf-k1ll3d_a", ".hf-old-hf-k1ll3d_b", ".hf-export-hf-2-abcdefgh"):  # the last: out 'hf-2'
    _folder(str(tmp_path / name), name)
  new = files.new_folder_beside(out)
  umask = os.umask(0)
  os.umask(umask)
  assert os.path.basename(new).startswith(".hf-export-hf-") and os.stat(new).st_mode & 0o777 == 0o777 & ~umask
  _folder(os.path.join(new, "x"), "unused")
  with open(os.path.join(new, "config.json"), "w") as f:
    f.write("new")
  files.put_in_place(new, out)
  assert _text(out) == "new" and _hidden(tmp_path) == [".hf-export-hf-2-abcdefgh"]
  err = capsys.readouterr().err
  assert f"note: removed {tmp_path}/.hf-export-hf-k1ll3d_a, left by an export to {out} that was killed." in err
  assert f"{tmp_path}/.hf-old-hf-k1ll3d_b" in err and "hf-2-" not in err


def test_without_an_exchange_a_kill_between_the_renames_keeps_the_old_export_hidden(tmp_path, monkeypatch):
  monkeypatch.setattr(files, "_exchange", lambda a, b: False)
  out = str(tmp_path / "hf")
  _folder(out, "old")
  new = files.new_folder_beside(out)
  real, calls = os.replace, []

  def replace(a, b):
    calls.append((a, b))
    if len(calls) == 2:
      raise KeyboardInterrupt  # the process dies between its two renames
    real(a, b)
  monkeypatch.setattr(files.os, "replace", replace)
  with pytest.raises(KeyboardInterrupt):
    files.put_in_place(new, out)
  monkeypatch.setattr(files.os, "replace", real)
  (old,) = [n for n in _hidden(tmp_path) if n.startswith(".hf-old-hf-")]
  assert not os.path.exists(out) and _text(str(tmp_path / old)) == "old"  # whole, beside out
  newer = files.new_folder_beside(out)
  _folder(os.path.join(newer, "sub"), "x")
  files.put_in_place(newer, out)
  assert os.path.isdir(os.path.join(out, "sub")) and _hidden(tmp_path) == []


KILLED = textwrap.dedent("""
    import os, runpy, shutil, signal, sys
    from vlm_jax.hf import files
    where = sys.argv.pop(1)
    if where == "writing":
      def save_weights(out, state_dict):
        with open(os.path.join(out, files.WEIGHTS), "wb") as f:
          f.write(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)
      files.save_weights = save_weights
    else:  # right after the new export took the old one's place, before the old one is deleted
      exchange = files._exchange
      def swapped(a, b):
        assert exchange(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
      files._exchange = swapped
    sys.argv = ["convert_to_hf.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(sys.path[0] or ".", "tools/convert_to_hf.py"), run_name="__main__")
""")


def _weights(path):
  return load_file(os.path.join(path, files.WEIGHTS))


def _same(a, b):
  return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_sigkill_during_an_overwrite_leaves_a_whole_export(data_dir, tmp_path, capsys):
  cfg = config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny"))
  with cfg.unlocked():
    cfg.data_dir, cfg.total_steps, cfg.checkpoint_every_steps, cfg.evals.splits = data_dir, 2, 1, ""
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  train.train(cfg, workdir)
  refs = {}
  for step in (1, 2):
    export.export_workdir(workdir, str(tmp_path / f"ref{step}"), step=step)
    refs[step] = _weights(str(tmp_path / f"ref{step}"))
  assert not _same(refs[1], refs[2])
  export.export_workdir(workdir, out, step=1)
  env = dict(os.environ, PYTHONPATH=REPO)
  for where, expected in (("writing", 1), ("swapped", 2)):
    killed = subprocess.run([sys.executable, "-c", KILLED, where, "--workdir", workdir, "--out", out, "--step", "2",
                             "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _same(_weights(out), refs[expected]), where  # the old export, then the new one: whole either way
    assert any(n.startswith(".hf-export-hf-") for n in _hidden(tmp_path)), where
  capsys.readouterr()
  export.export_workdir(workdir, out, step=1, overwrite=True)
  assert _same(_weights(out), refs[1]) and _hidden(tmp_path) == []
  assert capsys.readouterr().err.count(f"left by an export to {out} that was killed.") == 2
