"""Dataset preparation under failure: render workers in a threaded process, a worker that dies or
stalls, SIGKILL in the middle of the `shapes` build, of tokenizer training and of a folder's
preparation, and a full disk. Each time the next run succeeds and nothing partial passes as a
prepared dataset. Builds run in subprocesses (real kills) with timeouts.
"""

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import shutil
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from vlm_jax.data import tokenizer_source
from vlm_jax.data import tokenizer as tokenizer_lib
from vlm_jax.data.builders import folder, shapes
from vlm_jax.data.builders import shapes_scene as S
from vlm_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 240
WORKERS = {"VLM_JAX_SHAPES_WORKERS": "2", "VLM_JAX_SHAPES_EXAMPLES_PER_WORKER": "100"}

# A process like the trainer when it opens its data (JAX and TensorFlow threads already run):
# the child script of tools/build_repeat.py, which prints "examples N" over all splits.
_spec = importlib.util.spec_from_file_location("build_repeat", os.path.join(REPO, "tools", "build_repeat.py"))
build_repeat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_repeat)
THREADED = build_repeat.CHILD


def _env(**extra):
  return dict(os.environ, PYTHONPATH=REPO, **extra)


def _start(script, *args, **env):
  return subprocess.Popen([sys.executable, "-c", script, *args], env=_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=TIMEOUT_S):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
      p.kill()
    proc.communicate()
    pytest.fail(f"no result within {timeout} s: the process hung")
  return proc.returncode, out, err


def _wait_for(predicate, what, proc=None, timeout=TIMEOUT_S):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
    time.sleep(0.05)
  pytest.fail(f"timed out waiting for {what}")


def _render_workers(proc):
  """The render workers (children of the build subprocess) under proc, once both exist."""
  try:
    for child in psutil.Process(proc.pid).children():
      if "vlm_jax.data.builders.shapes_process" in " ".join(child.cmdline()):
        workers = child.children()
        return (child, workers) if len(workers) == 2 else None
  except psutil.NoSuchProcess:
    pass
  return None


def _incomplete(data_dir, name="shapes/tiny"):
  return glob.glob(os.path.join(data_dir, name, "incomplete.*"))


def _assert_tiny_shapes(data_dir):
  builder = shapes.builder("shapes/tiny", data_dir)
  assert builder.is_prepared()
  captions = [ex["caption"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="validation"))]
  expected = [S.caption(S.sample_scene(S.example_rng(1, i))) for i in range(100)]
  assert sorted(captions) == sorted(expected)
  assert not _incomplete(data_dir)


def test_worker_build_in_a_process_with_jax_and_tf_threads(tmp_path):
  d = str(tmp_path / "tfds")
  rc, out, err = _finish(_start(THREADED, "shapes/tiny", d, **WORKERS))
  assert rc == 0, err[-3000:]
  assert "Building dataset shapes/tiny with 2 render processes" in err
  assert out.split() == ["examples", "800"]  # 600 train + 100 validation + 100 test
  _assert_tiny_shapes(d)


@pytest.mark.parametrize("sig, message", [(signal.SIGKILL, "died"), (signal.SIGSTOP, "sent nothing for 3 s")])
def test_a_dead_or_stalled_render_worker_is_one_error_not_a_hang(tmp_path, sig, message):
  d = str(tmp_path / "tfds")
  proc = _start(THREADED, "shapes/tiny", d, VLM_JAX_SHAPES_WORKER_TIMEOUT_S="3", **WORKERS)
  build, workers = _wait_for(lambda: _render_workers(proc), "the render workers", proc)
  os.kill(workers[0].pid, sig)
  rc, _, err = _finish(proc)
  last = err.strip().splitlines()[-1]
  assert rc == 2, err[-3000:]
  assert last.startswith("error: building dataset 'shapes/tiny' failed: render worker ")
  assert message in last and "Run again" in last
  assert not shapes.builder("shapes/tiny", d).is_prepared()
  assert not _incomplete(d)
  assert not build.is_running() and not any(w.is_running() for w in workers)


@pytest.mark.parametrize("workers", [False, True], ids=["in_process", "render_workers"])
def test_sigkill_during_the_shapes_build_then_the_next_run_builds_it(tmp_path, workers):
  d = str(tmp_path / "tfds")
  env = WORKERS if workers else {"VLM_JAX_SHAPES_WORKERS": "1"}
  proc = _start(THREADED, "shapes/tiny", d, **env)
  _wait_for(lambda: _incomplete(d), "the build to start writing", proc)
  children = psutil.Process(proc.pid).children(recursive=True)
  proc.kill()
  proc.communicate()
  assert _incomplete(d) and not shapes.builder("shapes/tiny", d).is_prepared()
  # The build subprocess and its workers end with the process that started them.
  _, alive = psutil.wait_procs(children, timeout=30)
  assert not alive
  rc, out, err = _finish(_start(THREADED, "shapes/tiny", d, **env))
  assert rc == 0, err[-3000:]
  _assert_tiny_shapes(d)  # the killed build's leftover is removed too


def test_disk_full_during_the_build_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
  d = str(tmp_path / "tfds")
  real = tfds.core.file_adapters.TfRecordFileAdapter.write_examples.__func__

  def write_examples(cls, path, iterator):
    if "validation" in os.fspath(path):  # the train split fits, validation does not
      raise tf.errors.ResourceExhaustedError(None, None, f"{path}; No space left on device")
    return real(cls, path, iterator)

  monkeypatch.setattr(tfds.core.file_adapters.TfRecordFileAdapter, "write_examples",
                      classmethod(write_examples))
  monkeypatch.setenv("VLM_JAX_SHAPES_WORKERS", "1")
  with pytest.raises(UserError) as e:
    shapes.prepare("shapes/tiny", d)
  assert str(e.value) == (f"no space left on the device of data_dir '{d}' while preparing dataset "
                          f"'shapes/tiny' (the partial copy was removed). Free space there or choose "
                          f"another --config.data_dir.")
  assert not shapes.builder("shapes/tiny", d).is_prepared() and not _incomplete(d)
  monkeypatch.undo()
  monkeypatch.setenv("VLM_JAX_SHAPES_WORKERS", "1")
  shapes.prepare("shapes/tiny", d)
  _assert_tiny_shapes(d)


TOKENIZER = textwrap.dedent("""
    import os, signal, sys
    from vlm_jax.data import tokenizer_source, sources
    from vlm_jax.data import tokenizer as tokenizer_lib
    builder = sources.open_source("shapes/tiny", sys.argv[1])
    if sys.argv[2] == "training":  # SIGKILL once the texts are read, while the trainer runs
      real = tokenizer_lib.train_tokenizer
      def train(texts, *a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
      tokenizer_lib.train_tokenizer = train
    else:  # SIGKILL half-way through writing the file
      real_write = tokenizer_lib.tempfile.mkstemp
      def mkstemp(*a, **k):
        fd, path = real_write(*a, **k)
        os.write(fd, b'{"version": "1.0", "trunc')
        os.kill(os.getpid(), signal.SIGKILL)
      tokenizer_lib.tempfile.mkstemp = mkstemp
    tokenizer_source.tokenizer_for_dataset(builder, vocab_size=300)
""")


@pytest.mark.parametrize("when", ["training", "writing"])
def test_sigkill_during_tokenizer_training_then_the_next_run_trains_it(data_dir, tmp_path, when):
  d = str(tmp_path / "tfds")
  shutil.copytree(data_dir, d)
  builder = shapes.builder("shapes/tiny", d)
  path = tokenizer_source.cache_path(builder, 300)
  assert not os.path.exists(path)
  rc, _, err = _finish(_start(TOKENIZER, d, when))
  assert rc == -signal.SIGKILL, err[-2000:]
  assert not os.path.exists(path)  # nothing half-written under the cached name
  tok = tokenizer_source.tokenizer_for_dataset(builder, vocab_size=300)
  saved = tokenizer_lib.Tokenizer.load(path)
  assert saved.backend.get_vocab() == tok.backend.get_vocab() and tok.vocab_size > 100
  assert tok.decode(tok.encode("a red circle")) == "a red circle"


FOLDER = textwrap.dedent("""
    import sys
    from vlm_jax.data.builders import folder
    folder.prepare(sys.argv[1], sys.argv[2])
""")


def test_sigkill_during_folder_preparation_then_the_next_run_prepares_it(tmp_path):
  root, d = tmp_path / "pets", str(tmp_path / "tfds")
  rng = np.random.default_rng(0)
  for label in ("cat", "dog"):
    (root / label).mkdir(parents=True)
    for i in range(600):
      Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
  proc = _start(FOLDER, str(root), d)
  # Mid-preparation: tfds' temporary folder exists while the images are decoded and written.
  _wait_for(lambda: glob.glob(os.path.join(d, "folder/*/incomplete.*")), "the preparation to start", proc)
  proc.kill()
  proc.communicate()
  assert glob.glob(os.path.join(d, "folder/*/incomplete.*"))
  assert not glob.glob(os.path.join(d, "folder/*/1.0.0"))
  builder = folder.prepare(str(root), d)
  assert builder.is_prepared() and builder.info.splits["train"].num_examples == 1200
  assert not glob.glob(os.path.join(d, "folder/*/incomplete.*"))
  labels = [int(ex["label"]) for ex in tfds.as_numpy(builder.as_dataset(split="train"))]
  assert sorted(np.bincount(labels)) == [600, 600]
  assert json.load(open(os.path.join(builder.data_dir, "dataset_info.json")))["name"]
