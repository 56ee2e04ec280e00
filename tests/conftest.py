"""Test setup: 8 simulated CPU devices for sharding tests, one tiny shapes dataset per session, and
one persistent XLA compilation cache per session, shared by the xdist workers and the CLI subprocesses
the tests start (the tiny models recur across tests; compiling each once keeps the suite within its
time budget)."""

import atexit
import os
import shutil
import sys
import tempfile

# Under pytest-xdist the controller imports this file first and its workers inherit the variable:
# both workers then share one cache (most tiny programs recur across test files), and only the
# process that made the folder removes it.
if "VLM_JAX_TEST_XLA_CACHE" not in os.environ:
  os.environ["VLM_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="vlm_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["VLM_JAX_TEST_XLA_CACHE"], True)
_XLA_CACHE = os.environ["VLM_JAX_TEST_XLA_CACHE"]
os.environ.update(JAX_COMPILATION_CACHE_DIR=_XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
# XLA:CPU spends much of a tiny program's compile in LLVM's optimisation passes, and the tests'
# programs run for milliseconds: at level 1 a 1-layer SigLIP train step compiles in 13.6 s
# instead of 18.7 s, its init in 5.9 s instead of 13.1 s. Level 1 keeps the optimised HLO and the
# numbers (checked: a bf16 ViT's compiled HLO and gradients, the two-tower sharded-vs-single-device
# losses, all bitwise as at the default level 2). Level 0 would compile 3x faster but changes
# results by a few ulps and fails test_parallel's 1e-5 loss match, so not that.
# Inherited by the xdist workers and the CLI subprocesses; an XLA_FLAGS naming a level is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data_dir holding the prepared `shapes/tiny` dataset (built once for the whole session)."""
  from vlm_jax.data.builders import shapes
  d = str(tmp_path_factory.mktemp("tfds"))
  shapes.prepare("shapes/tiny", d)
  return d


@pytest.fixture
def tiny_config(data_dir):
  """The quickstart recipe at its tiny size, reading the session's data_dir."""
  from vlm_jax import config
  cfg = config.load(os.path.join(REPO, "configs/vit_shapes.py:tiny"))
  cfg.data_dir = data_dir
  return cfg


# The test files that take longest (about 60-300 s each on 2 cores), longest first. With
# `--dist loadfile` each file runs whole on one worker, in collection order; starting the long ones
# first keeps one worker from running a long file alone at the end while the other idles.
SLOW_FIRST = ("tests/test_parallel.py", "tests/test_configs.py", "tests/test_cli.py", "tests/tasks/test_contrastive.py",
              "tests/tasks/test_captioning.py", "tests/test_multiprocess.py", "tests/test_reliability_resume.py",
              "tests/test_train.py", "tests/models/test_text.py", "tests/test_decode.py", "tests/hf/test_convert_cli.py")


def pytest_collection_modifyitems(config, items):
  rank = {f: i for i, f in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), REPO), len(rank)))  # stable
