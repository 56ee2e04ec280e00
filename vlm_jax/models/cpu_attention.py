"""The fused CPU attention kernel (`cpu_attention.cc`): build, registration, and its custom VJP.

`attention(q, k, v, scale, causal, precision)` computes `softmax(q k^T * scale) v` for
q [B, Tq, H, D] and k, v [B, Tk, H, D] in two XLA FFI custom calls (forward, backward), in one of
two builds of the kernel (`PRECISIONS`):

- "bfloat16": bf16 matmul operands with f32 accumulation, the numerics of `dtype_mm="bfloat16"`;
  needs a CPU with AVX512_BF16.
- "float32": f32 matmuls, the numerics of `dtype_mm="float32"`; needs AVX2 and FMA.

Each build is compiled by a C++ compiler once per source and jaxlib version into `$VLM_JAX_CACHE`
(default `~/.cache/vlm_jax`) and loaded with ctypes. `unavailable(precision)` says why it cannot
be used here (None when it can); `layers.MultiHeadAttention` picks it through the model's
`attention` setting.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_COMMON = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w"]
# precision -> (compiler flags, CPU flags it needs from /proc/cpuinfo, FFI target name prefix)
_BUILDS = {
    "bfloat16": (_COMMON + ["-DVLM_ATTENTION_BF16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                            "-mavx512bf16", "-mfma"], ("avx512_bf16",), "vlm_jax_attention"),
    "float32": (_COMMON + ["-mavx2", "-mfma"], ("avx2", "fma"), "vlm_jax_attention_f32"),
}
PRECISIONS = tuple(_BUILDS)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
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
def _build(precision: str) -> str:
  """Compiles one build of the kernel (once per source, flags and jaxlib version) and registers its
  two FFI targets; returns "" on success, else the reason it failed."""
  cxx = _compiler()
  if cxx is None:
    return "no C++ compiler found (install g++, or set CXX)"
  flags, _, target = _BUILDS[precision]
  key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode() + jaxlib.__version__.encode()).hexdigest()[:16]
  cache = Path(os.environ.get("VLM_JAX_CACHE", "~/.cache/vlm_jax")).expanduser()
  lib = cache / f"cpu_attention_{key}.so"
  try:
    if not lib.exists():
      cache.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
      os.close(fd)
      cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode != 0:
        os.unlink(tmp)
        return f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}"
      os.replace(tmp, lib)  # atomic: concurrent builders (test workers) never see half a file
    so = ctypes.cdll.LoadLibrary(str(lib))
  except OSError as e:
    return f"{e} (set VLM_JAX_CACHE to a writable folder)"
  jax.ffi.register_ffi_target(f"{target}_fwd", jax.ffi.pycapsule(so.VlmAttentionFwd), platform="cpu")
  jax.ffi.register_ffi_target(f"{target}_bwd", jax.ffi.pycapsule(so.VlmAttentionBwd), platform="cpu")
  return ""


def unavailable(precision: str = "bfloat16") -> Optional[str]:
  """None if the `precision` build of the kernel can run here, else why not (naming the fix)."""
  what = f"the fused CPU attention kernel ({precision} matmuls)"
  if jax.default_backend() != "cpu":
    return f"{what} runs on CPU only (the backend is {jax.default_backend()})"
  missing = [f for f in _BUILDS[precision][1] if f not in _cpu_flags()]
  if missing:
    needs = " and ".join(m.upper() for m in missing)
    return f"{what} needs a CPU with {needs} (this one lacks it); use attention='xla'"
  reason = _build(precision)
  return f"{what} could not be built: {reason}" if reason else None


def _target(precision: str, part: str) -> str:
  """The FFI target of one half of the kernel, built and registered on first use."""
  reason = unavailable(precision)
  if reason:
    raise RuntimeError(reason)
  return f"{_BUILDS[precision][2]}_{part}"


def _fwd_call(q, k, v, scale, causal, precision):
  b, tq, h, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tq), jnp.float32))
  call = jax.ffi.ffi_call(_target(precision, "fwd"), out, vmap_method="sequential")
  return call(q, k, v, scale=np.float32(scale), causal=np.int32(causal))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def attention(q, k, v, scale: float, causal: bool = False, precision: str = "bfloat16"):
  """softmax(q k^T * scale) v over [B, T, H, D] arrays (keys j > query i masked when causal), with
  the matmuls of `precision` ("bfloat16" or "float32")."""
  return _fwd_call(q, k, v, scale, causal, precision)[0]


def _attention_fwd(q, k, v, scale, causal, precision):
  out, lse = _fwd_call(q, k, v, scale, causal, precision)
  return out, (q, k, v, lse)


def _attention_bwd(scale, causal, precision, res, g):
  q, k, v, lse = res
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  call = jax.ffi.ffi_call(_target(precision, "bwd"), shapes, vmap_method="sequential")
  return tuple(call(q, k, v, lse, g.astype(q.dtype), scale=np.float32(scale), causal=np.int32(causal)))


attention.defvjp(_attention_fwd, _attention_bwd)
