"""Reading and writing Hugging Face model folders without torch: safetensors, config.json, the
image processor's preprocessor_config.json, tokenizer files.

Weights are written as float32 safetensors under the on-disk (classic) key names that
`from_pretrained` reads; nothing is ever pickled, and folders holding only `pytorch_model.bin` are
refused on import.

An export is written into a hidden `.hf-export-NAME-*` folder beside `out` (`new_folder_beside`)
and only then put in place (`put_in_place`): an existing export at `out` is swapped out in one
rename (renameat2 RENAME_EXCHANGE) where the file system has it, else renamed to a hidden
`.hf-old-NAME-*` folder just before the new one takes its place, and deleted after. Hidden folders
that a killed export left beside `out` are removed once the next export to `out` is in place.
"""

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

from vlm_jax.errors import UserError
from vlm_jax.workdir import local_dir

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, HF's `resample` code


def save_weights(out: str, state_dict: dict) -> str:
  path = os.path.join(out, WEIGHTS)
  save_file({k: np.array(v, np.float32, order="C") for k, v in state_dict.items()}, path,  # 0-d stays 0-d
            metadata={"format": "pt"})
  return path


def save_json(out: str, name: str, obj: dict) -> str:
  path = os.path.join(out, name)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  return path


def image_processor_config(inp) -> dict:
  """preprocessor_config.json reproducing our evaluation preprocessing (`data.preprocess.eval_image`):

  RGB, resize to image_size x image_size with Pillow's bilinear filter, x / 255, (x - mean) / std.
  `preprocess.resize` is Pillow's resize re-done in tf, so the pixels are identical at any input
  size (tests/hf/test_convert_cli.py), with Pillow >= 13 on the transformers side.
  """
  s = int(inp.image_size)
  return {"image_processor_type": "ViTImageProcessor", "do_convert_rgb": True, "do_resize": True,
          "size": {"height": s, "width": s}, "resample": PIL_BILINEAR, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [float(x) for x in inp.mean],
          "image_std": [float(x) for x in inp.std]}


def prepare_out(out: str, overwrite: bool) -> str:
  """Checks the export folder: absent, empty, or (with overwrite) a folder we may replace files in."""
  out = local_dir(out, "--out")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out '{out}' is a file, not a folder. Choose a folder path.")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f"--out '{out}' is not empty (nothing was written). Choose a new folder or pass --overwrite.")
  return out


def _prefix(out: str, kind: str) -> str:
  return f".hf-{kind}-{os.path.basename(out)}-"


def new_folder_beside(out: str) -> str:
  """A new hidden folder in `out`'s parent (created if needed) to write an export into."""
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=_prefix(out, "export"), dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
  return tmp


def leftovers(out: str) -> list:
  """The hidden folders beside `out` that exports to `out` made (mkdtemp's 8-character suffix, so
  that the folders of an export to `out-2` are not taken for them)."""
  parent = os.path.dirname(out)
  found = []
  for kind in ("export", "old"):
    prefix = _prefix(out, kind)
    for name in os.listdir(parent):
      rest = name[len(prefix):]
      if name.startswith(prefix) and len(rest) == 8 and "-" not in rest and os.path.isdir(os.path.join(parent, name)):
        found.append(os.path.join(parent, name))
  return sorted(found)


def put_in_place(new: str, out: str) -> None:
  """Moves the complete export `new` to `out`, replacing what `out` holds. A kill at any moment
  leaves the old or the new export at `out` (on file systems without an atomic exchange, `out` is
  missing between two renames, the old export then in `.hf-old-*`), plus hidden folders that the
  next export removes."""
  if os.path.isdir(out) and _exchange(new, out):
    shutil.rmtree(new)  # now the old export
  elif os.path.isdir(out):
    old = tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=os.path.dirname(out))
    os.replace(out, old)  # a folder may replace an empty one
    os.replace(new, out)
    shutil.rmtree(old)
  else:
    os.replace(new, out)
  for path in leftovers(out):
    shutil.rmtree(path, ignore_errors=True)
    print(f"note: removed {path}, left by an export to {out} that was killed.", file=sys.stderr, flush=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths atomically (Linux renameat2); False where the system or file system lacks it."""
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None, use_errno=True)
  if not hasattr(libc, "renameat2"):
    return False
  if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(code, os.strerror(code), b)


def read_model_folder(path: str) -> tuple[dict, dict]:
  """(config.json dict, {key: float32 array}) of a local HF model folder saved as safetensors."""
  path = os.path.abspath(os.path.expanduser(path))
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"'hf:{path}' is not a Hugging Face model folder: it has no config.json. Point "
                    f"init_from at a folder written by save_pretrained (or tools/convert_to_hf.py).")
  with open(cfg_path) as f:
    config = json.load(f)
  files = []
  if os.path.isfile(os.path.join(path, WEIGHTS)):
    files = [WEIGHTS]
  elif os.path.isfile(os.path.join(path, WEIGHTS_INDEX)):
    with open(os.path.join(path, WEIGHTS_INDEX)) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  if not files:
    other = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" It holds {', '.join(other)}: pickled weights are not loaded here; re-save with "
            f"`model.save_pretrained(dir, safe_serialization=True)`." if other else "")
    raise UserError(f"'hf:{path}' has no {WEIGHTS}.{hint}")
  sd = {}
  for name in files:
    for k, v in load_file(os.path.join(path, name)).items():
      sd[k] = np.asarray(v, np.float32)
  return config, sd
