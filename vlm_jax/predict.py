"""python -m vlm_jax.predict --workdir DIR --image PATH [PATH ...] [--question TEXT] [--step N]

Prints one line per image, `PATH<TAB>PREDICTION`: a class label, a caption, with --question an
answer; each task's prompt option (`Task.prompt_option`: --question, --refer) is a flag. Images of any size, mode (RGB, RGBA, grayscale, palette, 16-bit) and format (JPEG, PNG,
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
from PIL import Image

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


def prompt_options() -> dict:
  """{option: help} of the registered tasks' prompt options (the CLI's --OPTION TEXT flags)."""
  out = {}
  for module in tasks.TASKS.values():
    option = module.Task.prompt_option
    if option:
      out.setdefault(option, module.Task.prompt_help)
  return out


def _prompt(workdir: str, task_name: str, given: dict) -> str:
  """The prompt text of `given` ({option: text}) for the run's task; a wrong option is an error."""
  given = {k: v for k, v in (given or {}).items() if v}
  option = tasks.module(task_name).Task.prompt_option
  wrong = sorted(set(given) - {option})
  if wrong:
    fix = f"Use --{option} instead" if option else "Leave it out"
    raise UserError(f"--{wrong[0]} is not an option of '{workdir}', which trained task '{task_name}'"
                    f"{' (it takes --' + option + ')' if option else ', which takes images only'}. {fix}.")
  return given.get(option, "")


def predict(workdir: str, paths: list, prompts: dict | None = None, step=None, mesh=None) -> list:
  """Returns [(path, prediction or None, error or None)] in the order of `paths`; `prompts` maps a
  prompt option to its text ({"question": "what color is the circle?"})."""
  prompt = ""

  def edit(cfg):
    nonlocal prompt
    prompt = _prompt(workdir, cfg.task, prompts)
    tasks.module(cfg.task).Task.predict_config(cfg, prompt)
  runtime, params, step = restore_run(workdir, step, edit, mesh=mesh)
  cfg = runtime.cfg

  results, images, sizes = [], [], []
  for p in paths:
    try:
      images.append(load_image(p, cfg.input))
      with Image.open(p) as im:  # header only: the original size that boxes are given in
        sizes.append((im.height, im.width))
      results.append([p, None, None])
    except (ValueError, OSError) as e:
      results.append([p, None, f"error: cannot read image: {e}"])
  if images:
    texts = _predict_images(runtime, params, np.stack(images), prompt, sizes)
    for r, text in zip([r for r in results if r[2] is None], texts):
      r[1] = text
  return [tuple(r) for r in results]


def _predict_images(runtime, params, images, prompt, sizes):
  shards = parallel.data_shards(runtime.mesh)
  n = len(images)
  pad = (-n) % shards
  task = runtime.task
  batch = task.predict_inputs(np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]), prompt)
  with runtime.context():
    preds = jax.jit(task.predict_fn)(params, parallel.shard_batch(batch, runtime.mesh))
  preds = jax.tree.map(np.asarray, jax.device_get(preds))
  return task.format(preds, list(sizes) + [(1, 1)] * pad)[:n]


def main(argv=None):
  argv = sys.argv if argv is None else argv
  flags.DEFINE_string("workdir", None, "A training workdir.")
  flags.DEFINE_multi_string("image", [], "Image file(s); the flag takes several paths after it.")
  for option, help_text in prompt_options().items():
    flags.DEFINE_string(option, "", help_text)
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
    given = {option: FLAGS[option].value for option in prompt_options()}
    for path, text, err in predict(FLAGS.workdir, images, given, FLAGS.step, FLAGS.mesh):
      print(f"{path}\t{text if err is None else err}", flush=True)
      status["failed"] |= err is not None
  rc = run_cli(run, argv)
  sys.exit(rc or int(status["failed"]))


if __name__ == "__main__":
  main()
