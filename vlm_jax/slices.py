"""TPU slices by the names users write (`v5p-128`, `v5e-256`, ...): one table, and their abstract devices.

A name is GENERATION-N. For v4 and v5p, N counts TensorCores (two per chip, run as one "megacore"
device), so v5p-128 is 64 chips; for v5e and v6e, N counts chips. Each entry knows its chip count,
HBM per chip, dense bf16 peak (`flops.PEAK_BF16_TFLOPS`) and the libtpu topology string that
`jax.experimental.topologies.get_topology_desc` takes (`v5p:4x4x4`), which gives the slice's
devices without a TPU: compiling for them runs the real TPU compiler on this host (needs libtpu).
"""

import dataclasses
import importlib.util
import math
import os

from jax.experimental import topologies

from vlm_jax import flops
from vlm_jax.config import nearest
from vlm_jax.errors import UserError

GiB = 1 << 30

# generation -> (device_kind as libtpu reports it, HBM GiB per chip, cores counted per chip in the
# name, {chips: libtpu chip grid}). Grids follow Cloud TPU's slice shapes.
_CUBES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
          512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_PLANES = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GENERATIONS = {
    "v4": ("TPU v4", 32, 2, _CUBES),
    "v5p": ("TPU v5", 95, 2, _CUBES),
    "v5e": ("TPU v5 lite", 16, 1, _PLANES),
    "v6e": ("TPU v6 lite", 32, 1, _PLANES),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as users write it, e.g. v5p-128
  generation: str  # v4, v5p, v5e, v6e
  device_kind: str
  chips: int
  hbm_bytes: int  # per chip
  peak_flops: float  # dense bf16 FLOP/s per chip
  topology: str  # libtpu's name, e.g. v5p:4x4x4


def _peak(device_kind: str) -> float:
  kind = device_kind.lower()
  return next(t for key, t in flops.PEAK_BF16_TFLOPS if key in kind) * 1e12


SLICES = {
    f"{gen}-{chips * per_chip}": Slice(f"{gen}-{chips * per_chip}", gen, kind, chips, hbm * GiB, _peak(kind),
                                       f"{gen}:{grid}")
    for gen, (kind, hbm, per_chip, grids) in _GENERATIONS.items() for chips, grid in grids.items()
}


def lookup(name: str) -> Slice:
  """The slice called `name`; a UserError naming the nearest known name otherwise."""
  key = name.strip().lower()
  if key in SLICES:
    return SLICES[key]
  gen, _, size = key.partition("-")
  if gen in _GENERATIONS:
    same = [s for s in SLICES.values() if s.generation == gen]
    guess = nearest(key, SLICES)
    if size.isdigit() and int(size) > 0:  # the nearest size of that generation
      near = min(same, key=lambda s: abs(math.log(int(s.name.split("-")[1]) / int(size))))
      guess = f" Did you mean '{near.name}'?"
    raise UserError(f"unknown TPU slice '{name}'.{guess} {gen} slices: {', '.join(s.name for s in same)}.")
  raise UserError(f"unknown TPU slice '{name}'.{nearest(key, SLICES)} Write GENERATION-SIZE with a "
                  f"generation of {', '.join(_GENERATIONS)}, e.g. --topology=v5p-128 (v4/v5p sizes count "
                  f"TensorCores, two per chip; v5e/v6e sizes count chips).")


def devices(s: Slice) -> list:
  """The slice's abstract TPU devices (one per chip) from libtpu; UserError when libtpu is absent."""
  # No TPU is opened here, only its compiler: several such processes may share the host, which
  # libtpu's single-process lockfile (/tmp/libtpu_lockfile) would otherwise refuse.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    kw = {"chip_config_name": "megacore"} if s.generation == "v4" else {}  # else libtpu gives 2 per chip
    topo = topologies.get_topology_desc(platform="tpu", topology_name=s.topology, **kw)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"cannot get the devices of {s.name} ({s.topology}) from libtpu: {first[:300]}. Install "
                    f"libtpu matching jax (pip install \"jax[tpu]==$(python -c 'import jax; print(jax.__version__)')\") "
                    f"and run with JAX_PLATFORMS=cpu.") from None
  if len(topo.devices) != s.chips:
    raise UserError(f"libtpu gave {len(topo.devices)} devices for {s.name} ({s.topology}), expected {s.chips} "
                    f"chips; this libtpu counts that slice differently.")
  return topo.devices


def libtpu_missing() -> str:
  """Why TPU compilation is unavailable here ('' when libtpu is installed)."""
  return "" if importlib.util.find_spec("libtpu") else "libtpu is not installed (pip install \"jax[tpu]\")"
