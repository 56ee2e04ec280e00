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


# Tests that take over about 30 s each on 2 cores (with the module fixture they start), marked `slow`:
# `pytest -m "not slow"` leaves them out for a quick loop; the plain command runs everything. A name
# here that matches no test of a collected file is an error, so the list cannot go stale unnoticed.
SLOW = (
    "tests/tasks/test_captioning.py::test_caption_then_vqa_finetune",
    "tests/tasks/test_captioning.py::test_parallel_prediction_rows_read_only_mask_and_attend_both_ways",
    "tests/test_multiprocess.py::test_two_processes_train_checkpoint_resume_match_one_process",
    "tests/tasks/test_contrastive.py::test_siglip_trains_through_the_trainer_and_reports_retrieval",
    "tests/test_configs.py::test_siglip_b16_coco_one_fsdp_step_at_tiny_size",
    "tests/test_configs.py::test_cappa_b16_coco_one_fsdp_step_at_tiny_size",
    "tests/test_configs.py::test_vit_b16_imagenet_one_fsdp_step_at_tiny_size",
    # These share one module fixture (a CLI training run) that costs most of their time.
    "tests/test_cli.py::test_tiny_run_end_to_end_then_resume",
    "tests/test_cli.py::test_evaluate_cli_appends_contract_metrics",
    "tests/test_cli.py::test_predict_labels_and_error_lines",
    "tests/hf/test_convert_cli.py::test_image_processor_reproduces_eval_preprocessing",
    "tests/hf/test_convert_cli.py::test_hf_generate_equals_predict_token_for_token",
    "tests/hf/test_convert_cli.py::test_readme_recipe_runs_without_vlm_jax",
    "tests/hf/test_convert_cli.py::test_bad_inputs_give_one_message_and_overwrite_nothing",
    "tests/test_reliability_resume.py::test_reference_run_logs_every_step_once",
    "tests/test_reliability_resume.py::test_sigkill_at_a_random_step_resumes_bitwise",
    "tests/test_reliability_resume.py::test_sigkill_during_async_save_then_sigterm_resumes_bitwise",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` / `-k` deselect: they must see the marks and every test
def pytest_collection_modifyitems(config, items):
  where = lambda item: os.path.relpath(str(item.path), REPO)
  for item in items:
    if f"{where(item)}::{item.originalname}" in SLOW:
      item.add_marker(pytest.mark.slow)
  modules = {where(item): item.module for item in items if getattr(item, "module", None)}
  stale = [n for n in SLOW if n.split("::")[0] in modules and not hasattr(modules[n.split("::")[0]], n.split("::")[1])]
  if stale:
    raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {stale}")
  rank = {f: i for i, f in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(where(item), len(rank)))  # stable
