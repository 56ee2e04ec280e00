"""python tools/benchmark.py SUBCOMMAND ... : speed figures published in BENCHMARKS.md.

Subcommands (each prints a table and ends with one JSON line of the same figures):
  train-vit        train-step images/s of our ViT (the trainer's jitted step, AdamW) vs Hugging Face
                   PyTorch ViTForImageClassification of the same architecture, batch and optimizer,
                   timed in interleaved rounds in one process (medians); TFLOP/s and MFU from the
                   analytic FLOP count (vlm_jax.flops). `--profile DIR` also traces our step
                   (jax.profiler) and prints the time per XLA op kind (dots, copies, fusions).
  train-captioner  the same for our Captioner (ViT + cross-attention decoder) vs a
                   VisionEncoderDecoderModel (ViT + GPT-2 with cross-attention). The PyTorch
                   peers are built in tools/torch_peers.py.
  compile          compile time of the ViT train step, scanned vs unrolled layers, at several depths.
  input            input-pipeline images/s vs the train step's images/s for a recipe.
  decode           greedy decoding tokens/s with and without the KV cache, at several batch sizes and
                   generation lengths, on a randomly initialised captioner of the given shape.
  siglip-loss      loss + gradient of the SigLIP (or CLIP) loss over a global batch sharded across
                   N simulated CPU devices: the ring (`tasks.contrastive.sharded_loss`) vs the naive
                   loss on the all-gathered embeddings; compiled per-device temporary memory and
                   time per call at growing global batch.

Fairness: `--threads N` pins this process to N cores (sched_setaffinity, which also sizes XLA's CPU
thread pool) and sets torch.set_num_threads(N); the default is every core the process may use.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "siglip-loss" in sys.argv:  # simulated devices must be set before jax starts
  _n = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vlm_jax import config as config_lib, decode, flops, kernels, optim, parallel  # noqa: E402
from vlm_jax.data import sources  # noqa: E402
from vlm_jax.errors import UserError  # noqa: E402
from vlm_jax.models.vlm import Captioner  # noqa: E402
from vlm_jax.runtime import build  # noqa: E402
from vlm_jax.step import make_train_step  # noqa: E402
from tools import torch_peers  # noqa: E402


def _time(fn, repeats):
  jax.block_until_ready(fn())  # compile
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats


def bench_decode(a):
  rows = []
  for length in a.lengths:
    model = Captioner(encoder=dict(patch_size=a.patch, width=a.width, depth=a.depth, num_heads=a.heads,
                                   mlp_dim=4 * a.width),
                      decoder=dict(vocab_size=a.vocab, width=a.width, depth=a.depth, num_heads=a.heads,
                                   mlp_dim=4 * a.width, max_len=length + 1))
    for batch in a.batches:
      images = jax.random.normal(jax.random.PRNGKey(0), (batch, a.image_size, a.image_size, 3))
      params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), images[:1], jnp.zeros((1, 2), jnp.int32)))["params"]
      # eos_id=-1 never matches a token, so every example decodes the full length in both loops.
      kw = dict(max_len=length, bos_id=1, eos_id=-1, pad_id=0)
      cached = _time(lambda: decode.greedy(model, params, images, **kw), a.repeats)
      uncached = _time(lambda: decode.greedy_uncached(model, params, images, **kw), a.repeats)
      rows.append(dict(batch=batch, length=length, cached_tokens_per_s=batch * length / cached,
                       uncached_tokens_per_s=batch * length / uncached, speedup=uncached / cached))
  print(f"{'batch':>5} {'length':>6} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8}")
  for r in rows:
    print(f"{r['batch']:>5} {r['length']:>6} {r['cached_tokens_per_s']:>13.1f} {r['uncached_tokens_per_s']:>15.1f} "
          f"{r['speedup']:>8.2f}")
  return {"benchmark": "decode", "device": jax.devices()[0].device_kind, "rows": rows}


def _vit_config(a, scan=None):
  """A classification config of the requested ViT (CLS pooling and LayerNorm eps as HF's ViT)."""
  c = config_lib.base_config()
  c.task, c.batch_size, c.total_steps = "classification", a.batch, 1000
  c.model.update(dict(patch_size=a.patch, width=a.width, depth=a.depth, num_heads=a.heads, mlp_dim=4 * a.width,
                      pool="cls", ln_eps=1e-12, scan_layers=a.scan if scan is None else scan, remat="none",
                      dtype=a.dtype, param_dtype="float32", dtype_mm=a.dtype_mm, attention=a.attention))
  c.input.image_size = a.image_size
  c.optimizer.grad_clip_norm = 0.0  # the PyTorch loop does not clip either
  return c


def _vit_step(a):
  """(step(n) -> seconds for n steps, (our, the peer's) train FLOPs per image, batch, attention) of
  the trainer's jitted step on a fixed batch. The task's ViT runs the last block for the class token
  alone (`ViT.pooled_only`); HF's computes every token, so the peer's count is the full model's."""
  cfg = _vit_config(a)
  s = build(cfg, sources.DataInfo("synthetic", 1000, None, {}, ()), devices=jax.devices()[:1])
  step = make_train_step(s)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((a.batch, a.image_size, a.image_size, 3), np.float32),
           "label": rng.integers(0, 1000, a.batch).astype(np.int32)}
  with s.context():
    box = [s.init_state(jax.random.PRNGKey(0))]
    gb = parallel.shard_batch(batch, s.mesh)

    impl = _attention_impl(step.lower(box[0], gb).as_text())

  def run(n):
    with s.context():
      t = time.perf_counter()
      for _ in range(n):
        box[0], m = step(box[0], gb)
      jax.block_until_ready(m)
      return time.perf_counter() - t
  model = s.task.model
  return run, (flops.train_flops(flops.vit_forward(model, a.image_size)),
               flops.train_flops(flops.vit_forward(model.clone(pooled_only=False), a.image_size))), batch, impl


def _caption_step(a):
  """Our Captioner (CLS-pooled ViT encoder, so 197 tokens like HF's ViTModel) + AdamW, jitted."""
  attention_fn = kernels.attention_fn(a.attention, dtype=_dtype(a.dtype), dtype_mm=_dtype(a.dtype_mm),
                                      head_dim=a.width // a.heads)
  model = Captioner(encoder=dict(patch_size=a.patch, width=a.width, depth=a.depth, num_heads=a.heads,
                                 mlp_dim=4 * a.width, pool="cls", ln_eps=1e-12, scan_layers=a.scan,
                                 dtype=_dtype(a.dtype), dtype_mm=_dtype(a.dtype_mm), attention_fn=attention_fn),
                    decoder=dict(vocab_size=a.vocab, width=a.width, depth=a.dec_depth, num_heads=a.heads,
                                 mlp_dim=4 * a.width, max_len=a.text_len, scan_layers=a.scan, dtype=_dtype(a.dtype),
                                 dtype_mm=_dtype(a.dtype_mm), attention_fn=attention_fn))
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((a.batch, a.image_size, a.image_size, 3), np.float32),
           "tokens": rng.integers(1, a.vocab, (a.batch, a.text_len + 1)).astype(np.int32)}
  params = nn.meta.unbox(jax.jit(lambda r: model.init(r, batch["image"][:1], batch["tokens"][:1, :-1]))(
      jax.random.PRNGKey(0)))["params"]
  tx, _ = optim.make(config_lib.base_config().optimizer, 1000, params)

  def loss_fn(p, b):
    logits = model.apply({"params": p}, b["image"], b["tokens"][:, :-1], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), b["tokens"][:, 1:]).mean()

  def step(p, o, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss
  step = jax.jit(step, donate_argnums=(0, 1))
  box = [params, tx.init(params)]
  gb = jax.device_put(batch)

  impl = _attention_impl(step.lower(*box, gb).as_text())

  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      box[0], box[1], loss = step(box[0], box[1], gb)
    jax.block_until_ready(loss)
    return time.perf_counter() - t
  counts = flops.captioner_forward(model, batch["image"].shape[1], batch["tokens"].shape[1] - 1)
  return run, flops.train_flops(counts), batch, impl


def _attention_impl(program: str) -> str:
  """Which attention ran in a lowered train step: cuDNN's flash attention or XLA."""
  return "cudnn" if "cudnn$fmha" in program else "xla"


def _dtype(name):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _compare(a, ours, theirs, flops_per_image, what, attention_impl, tokens=0):
  """Interleaved timing rounds of our step and each peer step in `theirs` ({name: run}); medians,
  ratios (`ratio` against the f32 peer `hf_torch`, `ratio_<name>` against the others), TFLOP/s, MFU.
  `flops_per_image`: one count for both sides, or (ours, the peers') where our step skips work."""
  flops_per_image, peer_flops = flops_per_image if isinstance(flops_per_image, tuple) else (flops_per_image,) * 2
  run = ours
  t = time.perf_counter()
  run(1)
  compile_s = time.perf_counter() - t
  for peer in theirs.values():
    peer(1)
  mine, hf = [], {name: [] for name in theirs}
  for r in range(a.rounds):
    mine.append(a.batch * a.steps / run(a.steps))
    for name, peer in theirs.items():
      hf[name].append(a.batch * a.steps / peer(a.steps))
    print(f"round {r}: vlm_jax {mine[-1]:.2f} img/s" + "".join(f", {n} {v[-1]:.2f} img/s" for n, v in hf.items()),
          flush=True)
  ips = statistics.median(mine)
  peak = flops.peak_flops_per_device(a.peak_tflops, dtype_mm=a.dtype_mm)  # the peak of the matmuls we run
  peak_f32 = flops.peak_flops_per_device(a.peak_tflops)
  out = {"benchmark": what, "device": jax.devices()[0].device_kind, "threads": a.threads, "dtype": a.dtype,
         "dtype_mm": a.dtype_mm, "attention": a.attention, "attention_impl": attention_impl,
         "batch": a.batch, "rounds": a.rounds, "steps_per_round": a.steps,
         "compile_s": compile_s, "vlm_jax_images_per_s": ips, "vlm_jax_tflops": ips * flops_per_image / 1e12,
         "peak_tflops": peak / 1e12 if peak else None, "mfu": ips * flops_per_image / peak if peak else None,
         "peak_f32_tflops": peak_f32 / 1e12 if peak_f32 else None,
         "mfu_of_f32_peak": ips * flops_per_image / peak_f32 if peak_f32 else None,
         "vlm_jax_flops_per_image": flops_per_image, "peer_flops_per_image": peer_flops}
  if tokens:
    out["vlm_jax_tokens_per_s"] = ips * tokens
  for name, v in hf.items():
    suffix = "" if name == "hf_torch" else name[len("hf_torch"):]
    out[f"{name}_images_per_s"] = statistics.median(v)
    out[f"{name}_mfu"] = out[f"{name}_images_per_s"] * peer_flops / peak if peak else None
    out[f"ratio{suffix}"] = ips / out[f"{name}_images_per_s"]
    out[f"ratio{suffix}_of_round_medians"] = statistics.median([m / h for m, h in zip(mine, v)])
  if peak and peak_f32 and peak != peak_f32:
    print(f"peaks: {a.dtype_mm} matmuls {peak / 1e12:.3f} TFLOP/s (MFU), f32 {peak_f32 / 1e12:.3f} (MFU f32)")
  print(f"{'framework':>14} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'MFU f32':>8}")
  for name, v, fl in (("vlm_jax", ips, flops_per_image), *((n, out[f"{n}_images_per_s"], peer_flops) for n in hf)):
    mfu = f"{v * fl / peak:.3f}" if peak else "n/a"
    mfu32 = f"{v * fl / peak_f32:.3f}" if peak_f32 else "n/a"
    print(f"{name:>14} {v:>9.2f} {v * fl / 1e12:>8.3f} {mfu:>6} {mfu32:>8}")
  for name in hf:
    print(f"ratio vlm_jax / {name}: {ips / out[f'{name}_images_per_s']:.2f}")
  if a.profile:
    out["ops_ms_per_step"] = {k: v for k, v, _ in profile_ops(run, a.profile)[:15]}
  return out


def _op_kind(name: str) -> str:
  """XLA thunk name -> its kind: "ynn_fusion.569" -> "ynn_fusion"."""
  return re.sub(r"\.\d+$", "", name)


def profile_ops(run, directory: str, steps: int = 2, top: int = 15) -> list:
  """Traces `steps` steps of `run` (jax.profiler, perfetto trace under `directory`) and returns the
  XLA ops' time per step by kind, largest first: [(kind, ms per step, calls per step)]."""
  import glob
  import gzip
  run(1)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    run(steps)
  path = sorted(glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  ms, calls = {}, {}
  for e in events:
    name = e.get("name", "")
    # Thunks only: python frames ("$..."), the executor's own spans and end markers are not ops.
    if e.get("ph") != "X" or "dur" not in e or name.startswith(("$", "end: ")) or "::" in name or "(" in name:
      continue
    k = _op_kind(name)
    ms[k] = ms.get(k, 0.0) + e["dur"] / 1e3 / steps
    calls[k] = calls.get(k, 0) + 1
  rows = sorted(((k, v, calls[k] // steps) for k, v in ms.items()), key=lambda r: -r[1])
  print(f"XLA ops by kind (trace in {directory}):")
  print(f"{'op kind':>28} {'ms/step':>9} {'calls':>6}")
  for k, v, n in rows[:top]:
    print(f"{k:>28} {v:>9.1f} {n:>6}")
  return rows


def bench_train_vit(a):
  run, fl, batch, impl = _vit_step(a)
  return _compare(a, run, {} if a.no_hf else torch_peers.runs(a, lambda a, bf16: torch_peers.vit(a, batch, bf16)), fl,
                  "train-vit", impl)


def bench_train_captioner(a):
  run, fl, batch, impl = _caption_step(a)
  return _compare(a, run, {} if a.no_hf else torch_peers.runs(a, lambda a, bf16: torch_peers.captioner(a, batch, bf16)), fl,
                  "train-captioner", impl, a.text_len)


def bench_compile(a):
  rows = []
  for depth in a.depths:
    row = {"depth": depth}
    for scan in (True, False):
      a.depth = depth
      s = build(_vit_config(a, scan), sources.DataInfo("synthetic", 1000, None, {}, ()),
                devices=jax.devices()[:1])
      step = make_train_step(s)
      batch = {"image": jax.ShapeDtypeStruct((a.batch, a.image_size, a.image_size, 3), jnp.float32),
               "label": jax.ShapeDtypeStruct((a.batch,), jnp.int32)}
      with s.context():
        t = time.perf_counter()
        step.lower(s.abstract_state, batch).compile()
      row["scan_s" if scan else "unrolled_s"] = time.perf_counter() - t
    rows.append(row)
  print(f"{'depth':>5} {'scan s':>8} {'unrolled s':>11}")
  for r in rows:
    print(f"{r['depth']:>5} {r['scan_s']:>8.2f} {r['unrolled_s']:>11.2f}")
  return {"benchmark": "compile", "device": jax.devices()[0].device_kind, "width": a.width,
          "image_size": a.image_size, "batch": a.batch, "rows": rows,
          "scan_deepest_over_shallowest": rows[-1]["scan_s"] / rows[0]["scan_s"]}


def bench_input(a):
  """Input-pipeline images/s (this process, tf.data) vs the recipe's train-step images/s."""
  from vlm_jax.data import pipeline  # tf.data: of the benchmarks, only this one needs TensorFlow

  rows = []
  for recipe in a.recipes:
    cfg = config_lib.load(recipe)
    if a.data_dir:
      cfg.data_dir = a.data_dir
    s = build(cfg, devices=jax.devices()[:1])
    batches = pipeline.train_batches(cfg.input, cfg.data_dir, cfg.seed, cfg.batch_size, 0,
                                     features=s.task.features(cfg.input), encode=s.task.encode)
    first = next(batches)
    t = time.perf_counter()
    for _ in range(a.batches):
      next(batches)
    input_ips = a.batches * cfg.batch_size / (time.perf_counter() - t)
    step = make_train_step(s)
    with s.context():
      state = s.init_state(jax.random.PRNGKey(0))
      gb = parallel.shard_batch(first, s.mesh)
      state, m = step(state, gb)
      jax.block_until_ready(m)
      t = time.perf_counter()
      for _ in range(a.steps):
        state, m = step(state, gb)
      jax.block_until_ready(m)
    step_ips = a.steps * cfg.batch_size / (time.perf_counter() - t)
    rows.append(dict(recipe=recipe, batch=cfg.batch_size, input_images_per_s=input_ips,
                     train_step_images_per_s=step_ips, headroom=input_ips / step_ips))
  print(f"{'recipe':>28} {'input img/s':>12} {'step img/s':>11} {'headroom':>9}")
  for r in rows:
    print(f"{r['recipe']:>28} {r['input_images_per_s']:>12.1f} {r['train_step_images_per_s']:>11.1f} {r['headroom']:>9.2f}")
  return {"benchmark": "input", "rows": rows}


def _model_args(p, width=192, depth=12, heads=3, image_size=224, batch=32):
  p.add_argument("--width", type=int, default=width)
  p.add_argument("--depth", type=int, default=depth)
  p.add_argument("--heads", type=int, default=heads)
  p.add_argument("--image-size", type=int, default=image_size)
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--batch", type=int, default=batch)


def _train_args(p):
  _model_args(p)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (params stay f32)")
  p.add_argument("--dtype-mm", default="float32", choices=["float32", "bfloat16"],
                 help="our matmul operands (model.dtype_mm: bf16 products, f32 accumulation and activations)")
  p.add_argument("--attention", default="auto", choices=kernels.ATTENTION,
                 help="model.attention: XLA's einsums or cuDNN's flash attention (auto: cuDNN on a CUDA GPU for "
                      "bf16); the JSON's attention_impl says which ran")
  p.add_argument("--scan", action="store_true", help="scan over layers (default: unrolled, faster on CPU)")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (medians are reported)")
  p.add_argument("--steps", type=int, default=2, help="train steps per round and framework")
  p.add_argument("--no-hf", action="store_true", help="time only vlm_jax (e.g. where torch is absent)")
  p.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (0: table / measured)")
  p.add_argument("--profile", default="", help="also trace 2 of our steps into this folder and print ms per XLA op kind")


def bench_siglip_loss(a):
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from vlm_jax import parallel
  from vlm_jax.tasks import contrastive

  mesh = parallel.make_mesh(f"data={a.devices},fsdp=1,tensor=1", jax.devices()[:a.devices])
  naive = {"sigmoid": contrastive.sigmoid_loss, "softmax": contrastive.softmax_loss}[a.loss]
  fns = {"ring": lambda *x: contrastive.sharded_loss(a.loss, *x), "all-gather": naive}
  rows = []
  for batch in a.batches:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, batch, a.dim)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    row = dict(batch=batch, local_batch=batch // a.devices)
    with jax.set_mesh(mesh):
      shard = NamedSharding(mesh, P(parallel.BATCH_AXES))
      zi, zt = jax.device_put(z[0], shard), jax.device_put(z[1], shard)
      scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-10.0)
      for name, fn in fns.items():
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
        mem = step.lower(zi, zt, scale, bias).compile().memory_analysis().temp_size_in_bytes
        row[f"{name}_temp_mib"] = mem / 2**20
        row[f"{name}_ms"] = 1e3 * _time(lambda: step(zi, zt, scale, bias), a.repeats)
    rows.append(row)
  print(f"{'global B':>8} {'local b':>7} {'ring MiB':>9} {'all-gather MiB':>15} {'ring ms':>8} {'all-gather ms':>14}")
  for r in rows:
    print(f"{r['batch']:>8} {r['local_batch']:>7} {r['ring_temp_mib']:>9.2f} {r['all-gather_temp_mib']:>15.2f} "
          f"{r['ring_ms']:>8.1f} {r['all-gather_ms']:>14.1f}")
  return {"benchmark": "siglip-loss", "loss": a.loss, "devices": a.devices, "dim": a.dim,
          "device": jax.devices()[0].device_kind, "rows": rows}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=0, help="pin to this many cores, torch threads too (0: all)")
  p.add_argument("--json", default="", help="also write the figures to this file")
  sub = p.add_subparsers(dest="cmd", required=True)
  _train_args(sub.add_parser("train-vit", help="our ViT train step vs HF PyTorch ViTForImageClassification"))
  c = sub.add_parser("train-captioner", help="our captioner train step vs HF VisionEncoderDecoderModel")
  _train_args(c)
  c.add_argument("--dec-depth", type=int, default=4)
  c.add_argument("--vocab", type=int, default=1000)
  c.add_argument("--text-len", type=int, default=32, help="decoder input tokens per example")
  c = sub.add_parser("compile", help="compile time, scanned vs unrolled layers")
  _model_args(c)
  c.add_argument("--depths", type=int, nargs="+", default=[2, 12, 24])
  c.set_defaults(dtype="float32", dtype_mm="float32", attention="auto", scan=False)
  i = sub.add_parser("input", help="input pipeline images/s vs train step images/s")
  i.add_argument("--recipes", nargs="+", default=["configs/vit_shapes.py", "configs/cappa_shapes.py"])
  i.add_argument("--data-dir", default="")
  i.add_argument("--batches", type=int, default=30)
  i.add_argument("--steps", type=int, default=10)
  d = sub.add_parser("decode", help="KV-cache vs uncached greedy decoding")
  d.add_argument("--width", type=int, default=256)
  d.add_argument("--depth", type=int, default=4)
  d.add_argument("--heads", type=int, default=4)
  d.add_argument("--vocab", type=int, default=1000)
  d.add_argument("--image-size", type=int, default=64)
  d.add_argument("--patch", type=int, default=16)
  d.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  d.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
  d.add_argument("--repeats", type=int, default=3)
  c = sub.add_parser("siglip-loss", help="ring-sharded vs all-gather contrastive loss: memory and time")
  c.add_argument("--loss", choices=["sigmoid", "softmax"], default="sigmoid")
  c.add_argument("--devices", type=int, default=8, help="simulated CPU devices on the data axis")
  c.add_argument("--dim", type=int, default=128, help="embedding width")
  c.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  c.add_argument("--repeats", type=int, default=3)
  a = p.parse_args(argv)
  if getattr(a, "heads", None) and getattr(a, "width", None) and a.width % a.heads:
    p.error(f"--width {a.width} is not divisible by --heads {a.heads}")
  if a.threads:  # before the first JAX computation creates the CPU client and its thread pool
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:a.threads])
  a.threads = len(os.sched_getaffinity(0))
  try:
    import torch
    torch.set_num_threads(a.threads)
  except ImportError:
    pass
  bench = {"train-vit": bench_train_vit, "train-captioner": bench_train_captioner, "compile": bench_compile,
           "input": bench_input, "decode": bench_decode, "siglip-loss": bench_siglip_loss}[a.cmd]
  try:
    result = bench(a)
  except UserError as e:  # e.g. --heads that do not divide --width: one line, as the trainer's CLI
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  line = json.dumps(result)
  if a.json:
    with open(a.json, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
