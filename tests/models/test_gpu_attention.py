"""cuDNN flash attention on a CUDA GPU (`model.attention` "auto" / "cudnn", chosen by
`vlm_jax.kernels` and handed to the models as their `attention_fn`, through
`jax.nn.dot_product_attention`). No GPU here, so the tests pretend one (`kernels._backend`) and ask
JAX for its XLA implementation of the same call (`kernels._GPU_IMPL`): the choice must give the
models that path exactly where cuDNN applies (bf16/f16 compute or bf16 matmuls, head_dim a
multiple of 8), the models must call it for the calls it takes (no mask but the causal one, not
decoding) and give XLA's outputs and gradients through it, it must fall back where JAX refuses
cuDNN under "auto", and every impossible "cudnn" must name the cause and the fix.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from vlm_jax import config as config_lib, kernels
from vlm_jax.data import sources
from vlm_jax.errors import UserError
from vlm_jax.models.text import Decoder
from vlm_jax.models.vit import ViT
from vlm_jax.tasks import classification


@pytest.fixture
def fake_gpu(monkeypatch):
  """A CUDA backend as far as the attention dispatch can tell; returns the list of the calls that
  reached `jax.nn.dot_product_attention` (dtype, is_causal, implementation)."""
  calls = []
  real = jax.nn.dot_product_attention

  def spy(q, k, v, **kw):
    calls.append((q.dtype, kw["is_causal"], kw["implementation"]))
    return real(q, k, v, **kw)
  monkeypatch.setattr(kernels, "_backend", lambda: "gpu")
  monkeypatch.setattr(kernels, "_GPU_IMPL", "xla")
  monkeypatch.setattr(kernels.jax.nn, "dot_product_attention", spy)
  return calls


def _fn(att, dtype, width, heads, dtype_mm=jnp.float32):
  return kernels.attention_fn(att, dtype=dtype, dtype_mm=dtype_mm, head_dim=width // heads)


def _vit(att, dtype=jnp.bfloat16, heads=2, dtype_mm=jnp.float32, **kw):
  return ViT(num_classes=3, patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=heads, dtype=dtype,
             dtype_mm=dtype_mm, attention_fn=_fn(att, dtype, 32, heads, dtype_mm), **kw)


def _loss_and_grads(model, x, calls=None):
  """Loss and gradients of one jitted step; `calls` (the spy's list) then holds only its calls."""
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  if calls is not None:
    calls.clear()
  loss = lambda p: jnp.sum(model.apply(p, x)[0].astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def _trace(model, x, calls):
  """Traces (no compilation) the loss and gradients of `model`; `calls` then holds that trace's calls."""
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  calls.clear()
  jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply(p, x)[0].astype(jnp.float32) ** 2))).trace(params)


def _close(a, b, tol):
  np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol * float(np.abs(np.float32(b)).max()))


def _grads_close(got, want, tol):
  """Per leaf, to `tol` of the largest gradient anywhere: some leaves (the key biases) are zero
  up to rounding, so their own scale is noise."""
  scale = max(float(np.abs(np.float32(b)).max()) for b in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol * scale)


X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)


@pytest.mark.parametrize("att", ["auto", "cudnn"])
def test_vit_takes_the_gpu_path_and_matches_xla(fake_gpu, att):
  got = _loss_and_grads(_vit(att), X, fake_gpu)
  assert [c[1:] for c in fake_gpu] == [(False, "xla")] * 2  # not causal; the scanned layer is traced twice
  assert all(c[0] == jnp.bfloat16 for c in fake_gpu)
  want = _loss_and_grads(_vit("xla"), X)
  _close(got[0], want[0], 2e-2)
  _grads_close(got[1], want[1], 5e-2)


def test_f32_compute_with_bf16_matmuls_goes_to_cudnn_in_bf16(fake_gpu):
  _trace(_vit("auto", dtype=jnp.float32, dtype_mm=jnp.bfloat16), X, fake_gpu)
  assert len(fake_gpu) == 2 and all(c[0] == jnp.bfloat16 for c in fake_gpu)


def test_decoder_causal_self_and_cross_attention(fake_gpu):
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(1, 50, (3, 11)), jnp.int32)
  encoded = jnp.asarray(rng.standard_normal((3, 21, 32)), jnp.bfloat16)
  res = {}
  for att in ("xla", "auto"):
    dec = Decoder(vocab_size=50, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=16, dtype=jnp.bfloat16,
                  attention_fn=_fn(att, jnp.bfloat16, 32, 2))
    params = jax.jit(dec.init)(jax.random.PRNGKey(0), tokens, encoded)
    fake_gpu.clear()
    res[att] = jax.jit(jax.value_and_grad(
        lambda p, e: jnp.sum(dec.apply(p, tokens, e).astype(jnp.float32) ** 2), argnums=(0, 1)))(params, encoded)
  # causal self-attention and (not causal) cross-attention; the scanned layer is traced twice
  assert sorted(set(c[1] for c in fake_gpu)) == [False, True]
  _close(res["auto"][0], res["xla"][0], 2e-2)
  _grads_close(res["auto"][1], res["xla"][1], 5e-2)


def test_auto_keeps_xla_where_cudnn_does_not_apply(fake_gpu):
  assert _fn("auto", jnp.float32, 32, 2) is None  # f32 attention
  assert _fn("auto", jnp.bfloat16, 32, 8) is None  # head_dim 4
  assert _fn("auto", jnp.bfloat16, 512, 2) is None  # head_dim 256
  assert _fn("xla", jnp.bfloat16, 32, 2) is None
  _trace(_vit("auto", dtype=jnp.float32), X, fake_gpu)
  assert not fake_gpu
  _trace(_vit("auto", pool="map"), X, fake_gpu)  # the MAP head's probe attends without a mask
  assert len(fake_gpu) == 3  # the scanned layer (traced twice) and the MAP head


def test_auto_falls_back_where_jax_refuses_cudnn(fake_gpu, monkeypatch):
  def refuse(*a, **kw):
    raise NotImplementedError("Unsupported sequence length")
  monkeypatch.setattr(kernels.jax.nn, "dot_product_attention", refuse)
  got = _loss_and_grads(_vit("auto"), X)
  want = _loss_and_grads(_vit("xla"), X)
  np.testing.assert_array_equal(np.float32(got[0]), np.float32(want[0]))
  with pytest.raises(UserError, match="'cudnn' cannot run here: Unsupported sequence length.*'auto' or 'xla'"):
    _loss_and_grads(_vit("cudnn"), X)


def test_impossible_cudnn_is_a_clear_error(fake_gpu, monkeypatch):
  """Raised where the choice is made, before any model is built."""
  with pytest.raises(UserError, match=r"computes in bf16 or f16.*float32; set model.dtype or model.dtype_mm"):
    _fn("cudnn", jnp.float32, 32, 2)
  with pytest.raises(UserError, match="multiple of 8 and at most 128, not 4.*change num_heads or set model"):
    _fn("cudnn", jnp.bfloat16, 32, 8)
  with pytest.raises(UserError, match="'cpu_fused' is not one of auto, xla, cudnn"):
    _fn("cpu_fused", jnp.bfloat16, 32, 2)
  monkeypatch.setattr(kernels, "_backend", lambda: "cpu")
  with pytest.raises(UserError, match="needs a CUDA GPU, and this process runs on cpu"):
    _fn("cudnn", jnp.bfloat16, 32, 2)
  assert _fn("auto", jnp.bfloat16, 32, 2) is None  # a CPU never asks for it
  _trace(_vit("auto"), X, fake_gpu)
  assert not fake_gpu


def test_the_config_reaches_the_models_through_the_task(fake_gpu, monkeypatch):
  """`model.attention` in a recipe becomes the task model's attention_fn (and "cudnn" on a CPU the
  error of `kernels`, raised when the task is built)."""
  cfg = config_lib.load(os.path.join(REPO, "configs/vit_shapes.py"))
  info = sources.DataInfo("shapes", 4, ["a", "b", "c", "d"], {}, ())
  with cfg.unlocked():
    cfg.model.dtype = "bfloat16"
  assert classification.Task(cfg, info).model.attention_fn is not None
  with cfg.unlocked():
    cfg.model.attention = "xla"
  assert classification.Task(cfg, info).model.attention_fn is None
  monkeypatch.setattr(kernels, "_backend", lambda: "cpu")
  with cfg.unlocked():
    cfg.model.attention = "cudnn"
  with pytest.raises(UserError, match="needs a CUDA GPU"):
    classification.Task(cfg, info)
