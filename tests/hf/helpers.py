"""Shared pieces of the Hugging Face tests: random (non-trivial) params, exports of tiny models."""

import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np

IMAGE = 32


def randomize(params, seed=0, scale=0.1):
  """Every leaf plus noise: zero-initialised class tokens, heads, biases and LayerNorms become random."""
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(params))
  rng = np.random.default_rng(seed)
  out = [np.asarray(x, np.float32) + scale * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(treedef, out)


def input_config(image_size=IMAGE):
  return ml_collections.ConfigDict(dict(input=dict(image_size=image_size, mean=(0.5, 0.4, 0.3),
                                                   std=(0.2, 0.25, 0.3)), task=""))


def make_run(model, params, task="classification", class_names=None, encoder_only=False, **task_attrs):
  from vlm_jax.hf.export import Run
  cfg = input_config()
  cfg.task = task
  return Run(cfg, types.SimpleNamespace(model=model, **task_attrs), params, class_names, encoder_only)


def images():
  return np.random.default_rng(1).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)


def torch_images(images):
  import torch
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
