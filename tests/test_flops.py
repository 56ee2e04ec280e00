"""Analytic FLOP counts agree with XLA's cost analysis of unrolled models; peaks and MFU figures."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from vlm_jax import flops
from vlm_jax.models.vit import ViT
from vlm_jax.models.vlm import Captioner, TwoTower
from vlm_jax.tasks.contrastive import sigmoid_loss

B = 2  # cost analysis needs no execution: widths can be large enough that matmuls dominate


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def _counts(model, counts, args, loss):
  """(XLA forward, analytic forward, XLA gradient, analytic train) FLOPs per example."""
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args))["params"]
  fwd = lambda p, *a: model.apply({"params": p}, *a)
  xla_fwd = _xla_flops(fwd, params, *args) / B
  xla_train = _xla_flops(jax.grad(lambda p, *a: loss(fwd(p, *a))), params, *args) / B
  return xla_fwd, counts[0], xla_train, flops.train_flops(counts)


VIT = dict(num_classes=10, patch_size=8, width=256, depth=2, num_heads=4, mlp_dim=1024)


@pytest.mark.parametrize("pool,pooled_only", [("cls", False), ("cls", True), ("map", False)])
def test_vit_count_matches_cost_analysis_of_unrolled_model(pool, pooled_only):
  images = jnp.ones((B, 32, 32, 3))
  model = ViT(pool=pool, scan_layers=False, pooled_only=pooled_only, **VIT)
  labels = jnp.zeros((B,), jnp.int32)
  loss = lambda out: optax.softmax_cross_entropy_with_integer_labels(out[0], labels).mean()
  xla_fwd, fwd, xla_train, train = _counts(model, flops.vit_forward(model, 32), (images,), loss)
  # XLA also counts elementwise work (norms, softmax, GELU), a few percent at this width.
  assert fwd <= xla_fwd <= 1.06 * fwd, (xla_fwd, fwd)
  assert train <= xla_train <= 1.04 * train, (xla_train, train)


def test_captioner_count_matches_cost_analysis_of_unrolled_model():
  images, tokens = jnp.ones((B, 32, 32, 3)), jnp.zeros((B, 13), jnp.int32)
  model = Captioner(encoder=dict(patch_size=8, width=256, depth=2, num_heads=4, mlp_dim=1024, scan_layers=False),
                    decoder=dict(vocab_size=300, width=192, depth=2, num_heads=4, mlp_dim=768, max_len=16,
                                 scan_layers=False))
  loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  xla_fwd, fwd, xla_train, train = _counts(model, flops.captioner_forward(model, 32, 12), (images, tokens[:, :-1]), loss)
  assert fwd <= xla_fwd <= 1.06 * fwd, (xla_fwd, fwd)
  assert train <= xla_train <= 1.04 * train, (xla_train, train)


@pytest.mark.parametrize("image_proj", [False, True])
def test_two_tower_count_matches_cost_analysis_of_unrolled_model(image_proj):
  """Both towers, the projections and the B x B logits of the (single-device) sigmoid loss; at
  batch 64 and embedding 256 the logits are 2 * 64 * 256 FLOPs per example, about 0.1% of the
  forward pass, so a large batch is what would show them missing (checked below on its own)."""
  b = 64
  images, tokens = jnp.ones((b, 32, 32, 3)), jnp.ones((b, 12), jnp.int32)
  model = TwoTower(image=dict(patch_size=8, width=256, depth=2, num_heads=4, mlp_dim=1024, pool="map",
                              scan_layers=False),
                   text=dict(vocab_size=300, width=192, depth=2, num_heads=4, mlp_dim=768, max_len=12,
                             pool="last_position", scan_layers=False),
                   embed_dim=256 if not image_proj else 128, image_proj=image_proj, text_proj=True)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images, tokens))["params"]

  def loss(p, x, t):
    zi, zt = model.apply({"params": p}, x, t)
    return sigmoid_loss(zi, zt, p["logit_scale"], p["logit_bias"])
  counts = flops.two_tower_forward(model, 32, 12, b)
  fwd, embed = counts
  xla_fwd = _xla_flops(loss, params, images, tokens) / b
  assert fwd <= xla_fwd <= 1.06 * fwd, (xla_fwd, fwd)
  xla_train = _xla_flops(jax.grad(loss), params, images, tokens) / b
  assert flops.train_flops(counts) <= xla_train <= 1.04 * flops.train_flops(counts)
  assert flops.train_flops(counts) == 3 * fwd - embed
  # The logits grow with the global batch (B_local x B_global per device): 2 x E FLOPs per pair.
  dim = model.embed_dim
  assert flops.two_tower_forward(model, 32, 12, 4096)[0] - fwd == 2 * (4096 - b) * dim


def test_cost_analysis_counts_a_scanned_stack_once():
  """Why the count is analytic: with scan_layers XLA reports about one layer of a two-layer stack."""
  images = jnp.ones((B, 32, 32, 3))
  model = ViT(pool="cls", scan_layers=True, **VIT)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images))["params"]
  xla = _xla_flops(lambda p, x: model.apply({"params": p}, x)[0], params, images) / B
  assert xla < 0.6 * flops.vit_forward(model, 32)[0]


def test_vit_ti_count_is_the_known_figure():
  # ViT-Ti/16 at 224 px: ~1.26 GFLOPs multiply-adds per image forward (2.5 GFLOPs).
  model = ViT(num_classes=1000, patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768)
  fwd, _ = flops.vit_forward(model, 224)
  assert 2.4e9 < fwd < 2.6e9


def test_peaks_and_mfu():
  dev = lambda kind, platform="tpu": types.SimpleNamespace(device_kind=kind, platform=platform)
  assert flops.peak_flops_per_device(device=dev("TPU v5 lite")) == 197e12
  assert flops.peak_flops_per_device(device=dev("TPU v5p")) == 459e12
  assert flops.peak_flops_per_device(device=dev("NVIDIA H100 80GB HBM3", "gpu")) == 989e12
  assert flops.peak_flops_per_device(device=dev("NVIDIA A100-SXM4-40GB", "gpu")) == 312e12
  assert flops.peak_flops_per_device(device=dev("Some new chip")) is None
  assert flops.peak_flops_per_device(2.0) == 2e12
  cpu = flops.peak_flops_per_device()  # measured: positive and below anything a CPU can do
  assert 1e8 < cpu * jax.local_device_count() < 1e14
  assert 1e8 < flops.peak_flops_per_device(dtype_mm="bfloat16") * jax.local_device_count() < 1e14
  out = flops.throughput(100.0, flops.StepCost(1e9, 12, 4, 1e11))
  assert out == pytest.approx({"tokens_per_s": 1200.0, "tflops_per_device": 0.025, "mfu": 0.25})
  assert flops.throughput(100.0, flops.StepCost(1e9, 0, 4, None)) == {"tflops_per_device": 0.025}
  assert flops.throughput(100.0, flops.StepCost(None, 0, 4, 1e11)) == {}
  assert flops.tokens_per_example({"tokens": jnp.zeros((1, 33))}) == 32
  assert flops.tokens_per_example({"image": jnp.zeros((1, 8, 8, 3))}) == 0
