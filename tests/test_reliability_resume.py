"""Exact resume of real `python -m vlm_jax.train` subprocesses: SIGKILL (also mid async save),
SIGTERM preemption, re-run, and the final state equals an uninterrupted run's bitwise.

The trial machinery is tools/kill_resume.py (which runs 20+ trials for RELIABILITY.md); here
two short trials keep the cost to six subprocesses sharing one compilation cache.
"""

import os

import numpy as np
import pytest

from tools import kill_resume


@pytest.fixture(scope="module")
def harness(data_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("kill_resume"))
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the session's (tests/conftest.py)
  reference = kill_resume.reference_run(root, data_dir, cache)
  return root, data_dir, cache, reference


def test_reference_run_logs_every_step_once(harness):
  reference = harness[3]
  assert [r["step"] for r in reference["metrics"] if "train/loss" in r] == list(range(1, kill_resume.TOTAL_STEPS + 1))
  assert int(reference["state"]["step"]) == kill_resume.TOTAL_STEPS


def test_sigkill_at_a_random_step_resumes_bitwise(harness):
  root, data_dir, cache, reference = harness
  rec = kill_resume.run_trial(root, 0, np.random.default_rng(0), data_dir, cache, reference, [("SIGKILL", False)])
  assert not rec["problems"], kill_resume.describe(rec)
  assert rec["events"][0]["committed"], "the kill came before any checkpoint: the trial tested nothing"


def test_sigkill_during_async_save_then_sigterm_resumes_bitwise(harness):
  root, data_dir, cache, reference = harness
  rec = kill_resume.run_trial(root, 1, np.random.default_rng(1), data_dir, cache, reference,
                              [("SIGKILL", True), ("SIGTERM", False)])
  assert not rec["problems"], kill_resume.describe(rec)
  assert [e["signal"] for e in rec["events"]] == ["SIGKILL", "SIGTERM"], kill_resume.describe(rec)
  # The SIGTERM run stopped gracefully at a step past the kill, and the last run resumed there.
  assert rec["resumed_from"] == rec["events"][1]["stopped_at"] > rec["events"][0]["logged"] - 1
