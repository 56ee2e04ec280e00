"""Shared pieces of the Hugging Face tests: random (non-trivial) params, exports of tiny models."""

import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np

IMAGE = 32


def random_params(model, *inputs, seed=0, scale=0.1):
  """Random params of `model` (shapes by eval_shape, no init run): N(0, scale), LayerNorm scales 1 + N(0, scale).

  Class tokens, heads, biases and LayerNorms that init would set to constants are random too.
  """
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    x = scale * rng.standard_normal(s.shape).astype(np.float32)
    return x + 1 if str(getattr(path[-1], "key", "")) == "scale" else x
  return jax.tree_util.tree_map_with_path(draw, shapes)


def input_config(image_size=IMAGE):
  return ml_collections.ConfigDict(dict(input=dict(image_size=image_size, mean=(0.5, 0.4, 0.3),
                                                   std=(0.2, 0.25, 0.3)), task=""))


def make_run(model, params, task="classification", class_names=None, encoder_only=False, **task_attrs):
  from vlm_jax import tasks
  from vlm_jax.hf.export import Run
  cfg = input_config()
  cfg.task = task
  attrs = {"tokenizer": None, "hf_family": tasks.module(task).Task.hf_family, **task_attrs}
  return Run(cfg, types.SimpleNamespace(model=model, **attrs), params, class_names, encoder_only)


def images():
  return np.random.default_rng(1).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)


def torch_images(images):
  import torch
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
