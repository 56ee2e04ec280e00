"""python tools/benchmark.py SUBCOMMAND ... : speed figures published in BENCHMARKS.md.

Subcommands (each prints a table and ends with one JSON line of the same figures):
  decode   greedy decoding tokens/s with and without the KV cache, at several batch sizes and
           generation lengths, on a randomly initialised captioner of the given shape.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
  a = p.parse_args(argv)
  result = bench_decode(a)
  line = json.dumps(result)
  if a.json:
    with open(a.json, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
