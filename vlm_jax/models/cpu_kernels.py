"""Builds and registers the hand-written XLA:CPU kernels (`cpu_attention.cc`, `cpu_matmul.cc` with
its MLP epilogues, `cpu_norm.cc`).

Each entry of `KERNELS` is one build of one C++ source: its compiler flags, the CPU flags it
needs (from /proc/cpuinfo), and the XLA FFI targets it registers (target name -> exported
symbol). A build is compiled once per source, flags and jaxlib version into `$VLM_JAX_CACHE`
(default `~/.cache/vlm_jax`), loaded with ctypes and registered on first use. `unavailable(name)`
says why a build cannot run here (None when it can); `target(name, symbol)` returns the FFI target
registered for one exported handler of a build, building it first, or raises with that reason.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jaxlib

_HERE = Path(__file__).parent
_COMMON = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w"]
_AVX2 = ["-mavx2", "-mfma"]
_AVX512_BF16 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]


class Build(NamedTuple):
  what: str  # for messages
  source: str
  flags: tuple
  cpu_flags: tuple
  targets: dict  # FFI target name -> exported handler symbol


KERNELS = {
    "attention_bfloat16": Build("the fused CPU attention kernel (bfloat16 matmuls)", "cpu_attention.cc",
                                ("-DVLM_ATTENTION_BF16", *_AVX512_BF16), ("avx512_bf16",),
                                {"vlm_jax_attention_fwd": "VlmAttentionFwd",
                                 "vlm_jax_attention_bwd": "VlmAttentionBwd"}),
    "attention_float32": Build("the fused CPU attention kernel (float32 matmuls)", "cpu_attention.cc", tuple(_AVX2),
                               ("avx2", "fma"), {"vlm_jax_attention_f32_fwd": "VlmAttentionFwd",
                                                 "vlm_jax_attention_f32_bwd": "VlmAttentionBwd"}),
    "matmul_float32": Build("the CPU matmul kernel (float32)", "cpu_matmul.cc", tuple(_AVX2), ("avx2", "fma"),
                            {"vlm_jax_matmul_f32": "VlmMatmulF32",
                             "vlm_jax_matmul_bias_gelu_f32": "VlmMatmulBiasGeluF32",
                             "vlm_jax_matmul_gelu_grad_f32": "VlmMatmulGeluGradF32"}),
    "layer_norm_float32": Build("the CPU LayerNorm kernel (float32)", "cpu_norm.cc",
                                # no contraction of the scalar tails into FMAs: an FMA there would
                                # subtract a row mean taken from differently rounded products
                                (*_AVX2, "-ffp-contract=off"), ("avx2", "fma"),
                                {"vlm_jax_layer_norm_fwd": "VlmLayerNormFwd",
                                 "vlm_jax_layer_norm_bwd": "VlmLayerNormBwd"}),
}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def _compiler() -> Optional[str]:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@functools.lru_cache(maxsize=None)
def _build(name: str) -> str:
  """Compiles one build (once per sources, flags and jaxlib version) and registers its FFI
  targets; returns "" on success, else the reason it failed."""
  cxx = _compiler()
  if cxx is None:
    return "no C++ compiler found (install g++, or set CXX)"
  b = KERNELS[name]
  source = _HERE / b.source
  flags = [*_COMMON, *b.flags, f"-I{_HERE}", f"-I{jax.ffi.include_dir()}"]
  digest = hashlib.sha256(source.read_bytes() + b"".join(h.read_bytes() for h in sorted(_HERE.glob("*.h"))))
  digest.update(" ".join(b.flags).encode() + jaxlib.__version__.encode())
  cache = Path(os.environ.get("VLM_JAX_CACHE", "~/.cache/vlm_jax")).expanduser()
  lib = cache / f"{source.stem}_{digest.hexdigest()[:16]}.so"
  try:
    if not lib.exists():
      cache.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
      os.close(fd)
      cmd = [cxx, *flags, str(source), "-o", tmp]
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode != 0:
        os.unlink(tmp)
        return f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
      os.replace(tmp, lib)  # atomic: concurrent builders (test workers) never see half a file
    so = ctypes.cdll.LoadLibrary(str(lib))
  except OSError as e:
    return f"{e} (set VLM_JAX_CACHE to a writable folder)"
  for target, symbol in b.targets.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(so, symbol)), platform="cpu")
  return ""


def multi_device() -> bool:
  """Whether the program being traced runs under a mesh of several devices. The kernels have no
  sharding rule, so XLA would gather their operands onto every device: callers use XLA there."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1


def unavailable(name: str) -> Optional[str]:
  """None if the build `name` (a key of KERNELS) can run here, else why not."""
  b = KERNELS[name]
  if jax.default_backend() != "cpu":
    return f"{b.what} runs on CPU only (the backend is {jax.default_backend()})"
  missing = [f for f in b.cpu_flags if f not in cpu_flags()]
  if missing:
    return f"{b.what} needs a CPU with {' and '.join(m.upper() for m in missing)} (this one lacks it)"
  reason = _build(name)
  return f"{b.what} could not be built: {reason}" if reason else None


def target(name: str, symbol: str) -> str:
  """The FFI target of build `name` that runs its exported handler `symbol`, built and registered
  on first use."""
  reason = unavailable(name)
  if reason:
    raise RuntimeError(reason)
  return next(t for t, s in KERNELS[name].targets.items() if s == symbol)
