"""Test setup: 8 simulated CPU devices for sharding tests, one tiny shapes dataset per session."""

import os
import sys

import jax

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
