"""python tools/benchmark.py SUBCOMMAND ... : speed figures published in BENCHMARKS.md.

Subcommands (each prints a table and ends with one JSON line of the same figures):
  decode       greedy decoding tokens/s with and without the KV cache, at several batch sizes and
               generation lengths, on a randomly initialised captioner of the given shape.
  siglip-loss  loss + gradient of the SigLIP (or CLIP) loss over a global batch sharded across
               N simulated CPU devices: the ring (`tasks.contrastive.sharded_loss`) vs the naive
               loss on the all-gathered embeddings; compiled per-device temporary memory and
               time per call at growing global batch.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "siglip-loss" in sys.argv:  # simulated devices must be set before jax starts
  _n = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vlm_jax import decode  # noqa: E402
from vlm_jax.models.vlm import Captioner  # noqa: E402


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
  sub = p.add_subparsers(dest="cmd", required=True)
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
  d.add_argument("--json", default="", help="also write the figures to this file")
  c = sub.add_parser("siglip-loss", help="ring-sharded vs all-gather contrastive loss: memory and time")
  c.add_argument("--loss", choices=["sigmoid", "softmax"], default="sigmoid")
  c.add_argument("--devices", type=int, default=8, help="simulated CPU devices on the data axis")
  c.add_argument("--dim", type=int, default=128, help="embedding width")
  c.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
  c.add_argument("--repeats", type=int, default=3)
  c.add_argument("--json", default="", help="also write the figures to this file")
  a = p.parse_args(argv)
  result = bench_decode(a) if a.cmd == "decode" else bench_siglip_loss(a)
  line = json.dumps(result)
  if a.json:
    with open(a.json, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
