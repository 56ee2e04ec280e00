"""Renders `shapes` examples: serially, or in worker processes that never fork a threaded process.

A process that has started JAX or TensorFlow threads must not fork: a child can inherit a lock
some thread held and block forever (and `multiprocessing.Pool.terminate` then waits for it).
So a config large enough for workers is built by `build_in_subprocess`: it starts
`python -m vlm_jax.data.builders.shapes_process`, which forks its render workers first, while it
has imported only numpy and PIL, and imports tensorflow-datasets after. Each worker renders every
W-th example and sends it as JSON over its own pipe (no lock is shared, nothing is pickled), every
wait on a worker has a timeout, and a worker that dies or stalls ends the build with one error.
The subprocess exits when its parent dies (its stdin closes) and holds the parent's build lock
while it lives.

Settings (environment): VLM_JAX_SHAPES_WORKERS (render processes, default the usable cores),
VLM_JAX_SHAPES_EXAMPLES_PER_WORKER (a split below 2x this is not worth workers; default 2000),
VLM_JAX_SHAPES_WORKER_TIMEOUT_S (longest wait for one example, default 300),
VLM_JAX_SHAPES_BUILD_TIMEOUT_S (longest whole build, default 3600).
"""

import base64
import json
import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np

from vlm_jax.data.builders import prepared, shapes_scene
from vlm_jax.errors import UserError, exception_chain


def setting(name: str, default: float) -> float:
  return float(os.environ.get(name, default))


def worker_count(num_examples: int) -> int:
  """Render processes worth starting for a split of num_examples (below 2: render serially)."""
  cores = int(setting("VLM_JAX_SHAPES_WORKERS", len(os.sched_getaffinity(0))))
  return min(cores, num_examples // int(setting("VLM_JAX_SHAPES_EXAMPLES_PER_WORKER", 2000)))


def rendered(split_id: int, index: int, image_size: int) -> dict:
  """shapes_scene.make_example with the image PNG-encoded (the costly part of an example)."""
  ex = shapes_scene.make_example(split_id, index, image_size)
  ex["image"] = shapes_scene.encode_png(ex["image"])
  return ex


def to_wire(ex: dict) -> bytes:
  """A rendered example as JSON bytes for the pipe (PNG as base64, boxes as lists): plain data, no
  pickle, and nothing in the receiver keeps a view into the pipe's buffer."""
  return json.dumps({
      **ex, "image": base64.b64encode(ex["image"]).decode("ascii"),
      "objects": [{**o, "bbox": [float(v) for v in o["bbox"]]} for o in ex["objects"]],
      "refs": [{**r, "bbox": [float(v) for v in r["bbox"]]} for r in ex["refs"]],
  }).encode()


def from_wire(data: bytes) -> dict:
  ex = json.loads(data)
  ex["image"] = base64.b64decode(ex["image"])
  for item in ex["objects"] + ex["refs"]:
    item["bbox"] = np.asarray(item["bbox"], np.float64)
  return ex


def render_serially(split_id: int, num_examples: int, image_size: int):
  for i in range(num_examples):
    yield rendered(split_id, i, image_size)


class RenderError(RuntimeError):
  """A render worker died or stopped answering."""


def _serve(conn, others) -> None:
  """A worker: for each task (split_id, n, size, k, count) sends examples k, k+count, ... < n."""
  for c in others:  # inherited ends of the other pipes: holding them would hide a peer's death
    c.close()
  while True:
    try:
      split_id, n, size, k, count = json.loads(conn.recv_bytes())
    except EOFError:  # the builder has gone
      return
    for i in range(k, n, count):
      conn.send_bytes(to_wire(rendered(split_id, i, size)))


class Renderers:
  """`count` forked render workers; `render` yields a split's examples in index order."""

  def __init__(self, count: int, timeout_s: float):
    ctx = multiprocessing.get_context("fork")  # forked before any thread of this process exists
    pipes = [ctx.Pipe() for _ in range(count)]
    self.timeout_s = timeout_s
    self.procs = []
    for mine, theirs in pipes:
      others = [c for pair in pipes for c in pair if c is not theirs]
      self.procs.append(ctx.Process(target=_serve, args=(theirs, others), daemon=True))
      self.procs[-1].start()
    for _, theirs in pipes:
      theirs.close()
    self.conns = [mine for mine, _ in pipes]

  def render(self, split_id: int, num_examples: int, image_size: int):
    count = len(self.conns)
    for k in range(count):
      self._call(k, f"split {split_id}", lambda c: c.send_bytes(json.dumps([split_id, num_examples, image_size, k, count]).encode()))
    for i in range(num_examples):
      yield self._call(i % count, f"example {i} of split {split_id}", self._receive)

  def _receive(self, conn):
    if not conn.poll(self.timeout_s):
      raise TimeoutError
    return from_wire(conn.recv_bytes())

  def _call(self, k: int, what: str, fn):
    proc = self.procs[k]
    try:
      return fn(self.conns[k])
    except TimeoutError:
      raise RenderError(f"render worker {proc.pid} sent nothing for {self.timeout_s:g} s ({what})") from None
    except (EOFError, ConnectionError):
      proc.join(5)
      raise RenderError(f"render worker {proc.pid} died (exit code {proc.exitcode}) before {what}") from None

  def close(self) -> None:
    for p in self.procs:
      p.kill()
    for p in self.procs:
      p.join(5)


def build_in_subprocess(name: str, data_dir: str, file_format, lock_fd: int) -> None:
  """Builds `name` into data_dir in a fresh process with render workers; raises UserError on failure."""
  timeout_s = setting("VLM_JAX_SHAPES_BUILD_TIMEOUT_S", 3600)
  cmd = [sys.executable, "-m", "vlm_jax.data.builders.shapes_process", name, data_dir, file_format or ""]
  # stdout carries only the error line; the build's own output goes to our stderr.
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(lock_fd,))
  try:
    proc.wait(timeout_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise UserError(f"building dataset '{name}' did not finish within {timeout_s:g} s. Run again, or "
                    f"allow more time with VLM_JAX_SHAPES_BUILD_TIMEOUT_S=SECONDS.") from None
  finally:
    proc.stdin.close()
  message = proc.stdout.read().decode(errors="replace").strip()
  proc.stdout.close()
  if proc.returncode == 2 and message:
    raise UserError(message)
  if proc.returncode != 0:
    raise UserError(f"building dataset '{name}' into data_dir '{data_dir}' failed (exit status "
                    f"{proc.returncode}; its output is above). Run again; nothing partial is kept.")


def exit_with_parent() -> None:
  """Ends this process when the parent dies (our stdin, its pipe, reaches end of file)."""
  fd = os.dup(0)

  def watch():
    while os.read(fd, 4096):  # the raw fd: a daemon thread must not hold sys.stdin's lock at exit
      pass
    os._exit(3)
  threading.Thread(target=watch, daemon=True).start()


def find_cause(exc, kind):
  """The first exception of type `kind` in `exc`'s chain, or None."""
  return next((x for x in exception_chain(exc) if isinstance(x, kind)), None)
