"""Reading a user's image folder without tfds: layout, records, bad-record checks, image decoding.

Pure Python + PIL (no tensorflow), so it runs and is tested on its own; `folder.py` wraps it in a
tfds builder. The layouts and rules are described in `folder.py`'s docstring.
"""

import dataclasses
import hashlib
import io
import json
import os
import re
import warnings

import numpy as np
from PIL import Image

from vlm_jax.errors import UserError

FORMAT = 1  # bump when what is stored per image changes: every folder is then prepared again
MAX_SIDE = 1024  # longer image side kept in the prepared dataset (training resizes further)
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SHOWN = 5  # skipped records listed by name in the warning


class BadRecord(ValueError):
  """A record that is skipped (the message says why)."""


@dataclasses.dataclass
class Record:
  path: str  # relative to the root, '/'-separated
  label: str | None = None
  captions: list = dataclasses.field(default_factory=list)
  qa: list = dataclasses.field(default_factory=list)  # (question, answer) pairs


@dataclasses.dataclass
class Scan:
  """What a folder holds, found without decoding images: records per split, schema, fingerprint."""
  root: str
  layout: str  # "classes" or "jsonl"
  splits: dict  # split -> [Record]
  skipped: list  # "where: why"
  notes: list = dataclasses.field(default_factory=list)  # fields ignored and why
  class_names: tuple = ()
  has_caption: bool = False
  has_qa: bool = False
  fingerprint: str = ""


# -- scanning ------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root + os.sep)


def _walk(root: str, skipped: list) -> dict:
  """{relative path: os.stat_result} of the image files under root (hidden entries ignored).

  Symlinked folders are not followed; a symlinked file counts only when it resolves inside root.
  """
  files = {}
  for d, dirs, names in os.walk(root, onerror=lambda e: skipped.append(f"{e.filename}: {e.strerror}")):
    rel_d = os.path.relpath(d, root)
    for name in list(dirs):
      if name.startswith(".") or os.path.islink(os.path.join(d, name)):
        dirs.remove(name)
        if not name.startswith("."):
          skipped.append(f"{_join(rel_d, name)}/: symlinked folder, not followed")
    for name in names:
      if name.startswith(".") or not _is_image(name):
        continue
      full, rel = os.path.join(d, name), _join(rel_d, name)
      if os.path.islink(full) and not inside(os.path.realpath(full), root):
        skipped.append(f"{rel}: symlink leaves the folder")
        continue
      try:
        files[rel] = os.stat(full)
      except OSError as e:
        skipped.append(f"{rel}: {e.strerror}")
  return dict(sorted(files.items()))


def _join(rel_dir: str, name: str) -> str:
  return name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"


def _sort_names(names) -> tuple:
  names = sorted(set(names))
  if names and all(re.fullmatch(r"-?\d+", n) for n in names):
    names = sorted(names, key=int)
  return tuple(names)


def _jsonl_files(root: str) -> dict:
  """{split: file name} of the annotation files at the root."""
  out = {}
  for name in sorted(os.listdir(root)):
    stem, ext = os.path.splitext(name)
    if ext != ".jsonl":
      continue
    split = SPLIT_ALIASES.get(stem, "train" if stem == "data" else stem)
    if split not in SPLITS:
      continue
    if split in out:
      raise UserError(f"folder '{root}' has both {out[split]} and {name} for split '{split}'. "
                      f"Keep one of them.")
    out[split] = name
  return out


def _split_dirs(root: str) -> dict | None:
  """{subfolder: split} when every subfolder of root is a split name, else None."""
  subdirs = [n for n in os.listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n))]
  if not subdirs or any(SPLIT_ALIASES.get(n, n) not in SPLITS for n in subdirs):
    return None
  seen = {}
  for n in sorted(subdirs):
    split = SPLIT_ALIASES.get(n, n)
    if split in seen:
      raise UserError(f"folder '{root}' has both {seen[split]}/ and {n}/ for split '{split}'. Keep one.")
    seen[split] = n
  return {n: split for split, n in seen.items()}


def _scan_classes(root: str, files: dict, skipped: list) -> dict:
  split_dirs = _split_dirs(root)
  splits = {split: [] for split in (split_dirs or {"": "train"}).values()}
  for rel in files:
    parts = rel.split("/")
    if split_dirs:
      if parts[0] not in split_dirs:
        skipped.append(f"{rel}: not inside a split folder ({', '.join(sorted(split_dirs))})")
        continue
      split, parts = split_dirs[parts[0]], parts[1:]
    else:
      split = "train"
    if len(parts) < 2:
      skipped.append(f"{rel}: not inside a class folder")
      continue
    splits[split].append(Record(rel, label=parts[0]))
  return splits


def _texts(value, key: str) -> list:
  values = [value] if isinstance(value, str) else value
  if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
    raise BadRecord(f"'{key}' must be a non-empty string or a list of non-empty strings")
  return [" ".join(v.split()) for v in values]  # one line each: evaluation joins references by newlines


def _pairs(obj: dict) -> list:
  if "qa" in obj:
    qa = obj["qa"]
    if not isinstance(qa, list) or not qa or not all(isinstance(p, dict) for p in qa):
      raise BadRecord("'qa' must be a non-empty list of {\"question\": ..., \"answer\": ...}")
    return [(_texts(p.get("question"), "question")[0], _texts(p.get("answer"), "answer")[0]) for p in qa]
  if "question" in obj or "answer" in obj:
    if "question" not in obj or "answer" not in obj:
      raise BadRecord("'question' and 'answer' must come together")
    return [(_texts(obj["question"], "question")[0], _texts(obj["answer"], "answer")[0])]
  return []


def _image_path(root: str, value) -> str:
  if not isinstance(value, str) or not value.strip():
    raise BadRecord("missing 'image' (a path relative to the folder)")
  if os.path.isabs(value) or value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
    raise BadRecord(f"image path '{value}' is absolute; give it relative to the folder")
  rel = os.path.normpath(value)
  if rel == ".." or rel.startswith(".." + os.sep):
    raise BadRecord(f"image path '{value}' leaves the folder")
  if not inside(os.path.realpath(os.path.join(root, rel)), root):
    raise BadRecord(f"image path '{value}' is a symlink that leaves the folder")
  if not os.path.isfile(os.path.join(root, rel)):
    raise BadRecord(f"image '{value}' does not exist")
  return rel.replace(os.sep, "/")


def _parse_line(root: str, line: str) -> Record:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRecord(f"not JSON ({e.msg})") from None
  if not isinstance(obj, dict):
    raise BadRecord("not a JSON object")
  rec = Record(_image_path(root, obj.get("image")))
  if "caption" in obj:
    rec.captions = _texts(obj["caption"], "caption")
  rec.qa = _pairs(obj)
  if "label" in obj:
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
      raise BadRecord("'label' must be a non-empty string or an integer")
    if "\n" in str(label):
      raise BadRecord("'label' contains a line break")
    rec.label = str(label).strip()
  return rec


def _scan_jsonl(root: str, annotations: dict, skipped: list) -> dict:
  splits = {}
  for split, name in annotations.items():
    merged = {}
    with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = _parse_line(root, line)
          if rec.path in merged:
            first = merged[rec.path]
            if rec.label is not None and first.label is not None and rec.label != first.label:
              raise BadRecord(f"label '{rec.label}' differs from an earlier line for '{rec.path}'")
            first.label = first.label if first.label is not None else rec.label
            first.captions += rec.captions
            first.qa += rec.qa
          else:
            merged[rec.path] = rec
        except BadRecord as e:
          skipped.append(f"{name} line {i}: {e}")
    splits[split] = list(merged.values())
  return splits


def _keep_common_fields(splits: dict, skipped: list, notes: list) -> tuple:
  """Keeps the fields at least half of the records carry; drops records lacking one of them."""
  records = [r for rs in splits.values() for r in rs]
  fields = {"label": lambda r: r.label is not None, "caption": lambda r: bool(r.captions),
            "qa": lambda r: bool(r.qa)}
  kept = []
  for name, has in fields.items():
    count = sum(map(has, records))
    if count and 2 * count >= len(records):
      kept.append(name)
    elif count:
      notes.append(f"'{name}' is given for only {count} of {len(records)} images and was ignored")
  for split, rs in splits.items():
    good = []
    for r in rs:
      missing = [name for name in kept if not fields[name](r)]
      if missing:
        skipped.append(f"{split} '{r.path}': missing {', '.join(repr(m) for m in missing)}")
      else:
        good.append(r)
    splits[split] = good
  return tuple(kept)


def _fingerprint(root: str, files: dict, annotations: dict) -> str:
  h = hashlib.sha256(f"{FORMAT} {MAX_SIDE}\n".encode())
  for rel, st in files.items():
    h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  for name in sorted(annotations.values()):
    with open(os.path.join(root, name), "rb") as f:
      h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def scan(root: str) -> Scan:
  """Reads the folder's structure and annotations (no image is decoded)."""
  root = os.path.realpath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise UserError(f"folder '{root}' does not exist or is not a directory. "
                    f"Check --config.input.data=folder:PATH.")
  if not os.access(root, os.R_OK | os.X_OK):
    raise UserError(f"folder '{root}' is not readable. Fix its permissions.")
  skipped, notes = [], []
  walk_skipped = []  # files the class layout would have used; JSONL names its own files
  files = _walk(root, walk_skipped)
  annotations = _jsonl_files(root)
  if annotations:
    splits, layout = _scan_jsonl(root, annotations, skipped), "jsonl"
  else:
    skipped += walk_skipped
    splits, layout = _scan_classes(root, files, skipped), "classes"
  for split, rs in splits.items():  # 0-byte files are known from the listing already
    good = []
    for r in rs:
      st = files.get(r.path)
      if st is not None and st.st_size == 0:
        skipped.append(f"{r.path}: empty file (0 bytes)")
      else:
        good.append(r)
    splits[split] = good
  kept = _keep_common_fields(splits, skipped, notes) if layout == "jsonl" else ("label",)
  labels = [r.label for rs in splits.values() for r in rs]
  result = Scan(root, layout, splits, skipped, notes,
                class_names=_sort_names(labels) if "label" in kept else (),
                has_caption="caption" in kept, has_qa="qa" in kept,
                fingerprint=_fingerprint(root, files, annotations))
  if not any(splits.values()):
    raise UserError(f"folder '{root}' holds no usable images. Expected class subfolders "
                    f"(ROOT/CLASS/IMAGE, optionally under train/ validation/ test/) or ROOT/data.jsonl "
                    f"(or train.jsonl, ...) with an 'image' path per line.{listing(result.skipped)}")
  for split, rs in splits.items():
    if not rs:
      raise UserError(f"split '{split}' of folder '{root}' has no usable images. Add readable images "
                      f"or remove that split's {'annotation file' if layout == 'jsonl' else 'folder'}."
                      f"{listing(result.skipped)}")
  return result


def listing(skipped: list, count: int | None = None) -> str:
  if not skipped:
    return ""
  count = len(skipped) if count is None else count
  more = f"; and {count - SHOWN} more" if count > SHOWN else ""
  return " Skipped: " + "; ".join(skipped[:SHOWN]) + more + "."


# -- images --------------------------------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode.startswith("I;16") or img.mode == "I":  # 16/32-bit integer: 0..65535 -> 0..255
    a = np.asarray(img).astype(np.float64) / 257.0
    img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
  elif img.mode == "F":
    a = np.asarray(img, np.float64)
    a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
    img = Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8), "L")
  return img if img.mode == "RGB" else img.convert("RGB")


def _png_rgb8(data: bytes) -> bool:
  """True for a PNG whose header says 8-bit RGB (bit depth byte 24, colour type byte 25)."""
  return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 8 and data[25] == 2


def load_image(path: str, max_side: int = MAX_SIDE) -> bytes:
  """Encoded 8-bit RGB image (JPEG or PNG) of the file at `path`, longer side <= max_side.

  Raises BadRecord for anything PIL cannot fully decode (empty, truncated, not an image, more
  pixels than PIL's decompression-bomb limit).
  """
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise BadRecord("empty file (0 bytes)")
  # PIL raises many exception types on malformed files (OSError, SyntaxError, ValueError,
  # struct.error, DecompressionBombError, ...): any failure here means an unreadable image.
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      img = Image.open(io.BytesIO(data))
      fmt, size = img.format, img.size
      if fmt == "JPEG" and max(size) > max_side:  # decode at a reduced scale: fast for huge JPEGs
        scale = max_side / max(size)
        img.draft("RGB", (max(1, int(size[0] * scale)), max(1, int(size[1] * scale))))
      img.load()
  except Exception as e:  # noqa: BLE001 (see above)
    why = re.sub(r" <_io\.BytesIO object at \w+>", "", (str(e).splitlines() or [""])[0])[:100]
    raise BadRecord(f"not a readable image ({type(e).__name__}: {why})") from None
  resized = max(img.size) > max_side
  if fmt == "JPEG" and img.mode == "RGB" and not resized and img.size == size:
    return data
  if fmt == "PNG" and _png_rgb8(data) and img.mode == "RGB" and not resized:
    return data
  rgb = _to_rgb(img)
  if resized:
    w, h = rgb.size
    scale = max_side / max(w, h)
    rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  if fmt == "JPEG":
    rgb.save(buf, format="JPEG", quality=95)
  else:
    rgb.save(buf, format="PNG")
  return buf.getvalue()
