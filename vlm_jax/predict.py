"""python -m vlm_jax.predict --workdir DIR --image PATH [PATH ...] [--question TEXT] [--step N]

Prints one line per image, `PATH<TAB>PREDICTION`: a class label, a caption, or with --question an
answer. Images of any size, mode (RGB, RGBA, grayscale, palette, 16-bit) and format (JPEG, PNG,
GIF, BMP, WebP; TIFF and the other formats PIL reads) go through the run's own evaluation
preprocessing; a missing or unreadable file gets `PATH<TAB>error: ...` and the others still run
(exit status 1 if any failed).
"""

import os
import sys

import jax
import numpy as np
import tensorflow as tf
from absl import flags

from vlm_jax import config as config_lib, parallel, tasks
from vlm_jax.data import preprocess
from vlm_jax.data.builders import folder_scan
from vlm_jax.errors import UserError, run_cli
from vlm_jax.runtime import restore_run

FLAGS = flags.FLAGS


def load_image(path: str, inp) -> np.ndarray:
  """The model input for one file, exactly as evaluation preprocesses a dataset image."""
  if not os.path.isfile(path):
    raise ValueError("no such file")
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise ValueError("empty file")
  try:
    return preprocess.eval_image(tf.constant(data), inp.image_size, inp.mean, inp.std).numpy()
  except (tf.errors.InvalidArgumentError, ValueError):
    pass
  try:  # formats TensorFlow cannot decode (TIFF, PPM, ...), read with PIL as folder datasets are
    data = folder_scan.load_image(path)
  except folder_scan.BadRecord as e:
    raise ValueError(str(e)) from None
  return preprocess.eval_image(tf.constant(data), inp.image_size, inp.mean, inp.std).numpy()


def predict(workdir: str, paths: list, question: str = "", step=None, mesh=None) -> list:
  """Returns [(path, prediction or None, error or None)] in the order of `paths`."""
  def edit(cfg):
    task_cls = tasks.module(cfg.task).Task
    if question and task_cls.prompt_option != "question":
      raise UserError(f"--question needs a run whose task takes a question; '{workdir}' trained task "
                      f"'{cfg.task}', which takes images only. Leave out --question.")
    task_cls.predict_config(cfg, question)
  runtime, params, step = restore_run(workdir, step, edit, mesh=mesh)
  cfg = runtime.cfg

  results, images = [], []
  for p in paths:
    try:
      images.append(load_image(p, cfg.input))
      results.append([p, None, None])
    except ValueError as e:
      results.append([p, None, f"error: cannot read image: {e}"])
  if images:
    texts = _predict_images(runtime, params, np.stack(images), question)
    for r, text in zip([r for r in results if r[2] is None], texts):
      r[1] = text
  return [tuple(r) for r in results]


def _predict_images(runtime, params, images, question):
  shards = parallel.data_shards(runtime.mesh)
  n = len(images)
  pad = (-n) % shards
  task = runtime.task
  batch = task.predict_inputs(np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]), question)
  with runtime.context():
    preds = jax.jit(task.predict_fn)(params, parallel.shard_batch(batch, runtime.mesh))
  preds = jax.tree.map(np.asarray, jax.device_get(preds))
  return task.format(preds)[:n]


def main(argv=None):
  argv = sys.argv if argv is None else argv
  flags.DEFINE_string("workdir", None, "A training workdir.")
  flags.DEFINE_multi_string("image", [], "Image file(s); the flag takes several paths after it.")
  flags.DEFINE_string("question", "", "Answer this question about each image (VQA) instead of captioning.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("mesh", None, "Mesh to run on (default: the run's where it fits, else FSDP over the devices).")
  flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
  flags.mark_flags_as_required(["workdir"])
  # `--image a.jpg b.png`: absl takes one value per flag, so gather the bare paths after it.
  fixed, images = [argv[0]], []
  it = iter(argv[1:])
  collecting = False
  for a in it:
    if a == "--image":
      collecting = True
      continue
    if a.startswith("--image="):
      images.append(a.split("=", 1)[1])
      continue
    if collecting and not a.startswith("--"):
      images.append(a)
      continue
    collecting = False
    fixed.append(a)
  status = {"failed": False}

  def run():
    config_lib.parse_argv(FLAGS, fixed)
    if not images:
      raise UserError("no --image given: pass one or more image paths, e.g. --image a.jpg b.png")
    for path, text, err in predict(FLAGS.workdir, images, FLAGS.question, FLAGS.step, FLAGS.mesh):
      print(f"{path}\t{text if err is None else err}", flush=True)
      status["failed"] |= err is not None
  rc = run_cli(run, argv)
  sys.exit(rc or int(status["failed"]))


if __name__ == "__main__":
  main()
