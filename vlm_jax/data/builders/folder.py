"""Users' own image folders as a tfds dataset: `--config.input.data=folder:/path/to/folder`.

Two layouts (see RELIABILITY.md "Your own data" for the full rules):

(a) Class per subfolder (like torchvision / tfds ImageFolder): `ROOT/CLASS/**/IMAGE`, or with
    splits `ROOT/{train,validation,test}/CLASS/**/IMAGE` (`val/` is read as `validation`). The
    folder is split-shaped when every one of its subfolders is a split name; otherwise it is one
    `train` split. Labels are a ClassLabel over the class folder names, sorted (numerically when
    all names are integers).
(b) Images plus JSONL: `ROOT/{train,validation,test}.jsonl` (or a single `ROOT/data.jsonl`,
    read as `train`); one JSON object per line with `image` (a path relative to ROOT) and any of
    `caption` (string or list of strings), `question` + `answer`, `qa` (list of
    {question, answer}), `label` (string or integer). Lines naming the same image are merged
    (their captions and QA pairs gathered into one example).

Features are what the tasks read, as in `shapes`: `image`, `label` (ClassLabel), `caption`
(sequence of texts), `qa` (sequence of {question, answer}), plus `path` (relative file name).

The prepared dataset lives in `DATA_DIR/folder/<name>-<path hash>-<fingerprint>/1.0.0`: the key
is the folder's absolute path and a fingerprint of its listing (every image's relative path,
size and modification time) and of the JSONL files' contents, so a changed folder is prepared
again and an unchanged one is reused. Nothing is ever written into the user's folder.

Bad records (unreadable, empty or truncated image files, JSONL lines that are not JSON or miss
fields, paths leaving the folder by `..`, an absolute path or a symlink) are skipped and counted;
one warning lists the first few. A split left with nothing valid is one clear error. Images are
decoded with PIL (never pickle), converted to 8-bit RGB (grayscale, palette, alpha and 16-bit
images included; alpha is dropped), downscaled so the longer side is at most
`folder_scan.MAX_SIDE` (1024 px), and stored as JPEG (JPEG sources: the original bytes when no
conversion was needed, else quality 95) or PNG. The scanning and decoding live in `folder_scan`.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import re

import tensorflow_datasets as tfds

from vlm_jax.data.builders import prepared
from vlm_jax.data.builders.folder_scan import BadRecord, Scan, inside, listing, load_image, scan
from vlm_jax.errors import UserError

KEPT_IN_METADATA = 100  # skipped records remembered in the prepared dataset's metadata.json

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """One prepared folder: its schema comes from the scan, its name from path and fingerprint."""
  root: str = ""
  layout: str = "classes"
  class_names: tuple = ()
  has_caption: bool = False
  has_qa: bool = False


def config_name(root: str, fingerprint: str) -> str:
  slug = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(root.rstrip(os.sep)))[:40] or "root"
  return f"{slug}-{hashlib.sha256(root.encode()).hexdigest()[:8]}-{fingerprint[:16]}"


class Folder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A user's folder of images (not in the tfds registry: built by `prepare` from a Scan)."""

  name = "folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Class-per-subfolder and JSONL layouts."}

  def __init__(self, folder_scan: Scan, data_dir: str):
    self.scan = folder_scan
    cfg = FolderConfig(name=config_name(folder_scan.root, folder_scan.fingerprint),
                       description=f"Images of {folder_scan.root}", root=folder_scan.root,
                       layout=folder_scan.layout, class_names=folder_scan.class_names,
                       has_caption=folder_scan.has_caption, has_qa=folder_scan.has_qa)
    super().__init__(data_dir=data_dir, config=cfg)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    feats = {"image": tfds.features.Image(shape=(None, None, 3)), "path": tfds.features.Text()}
    if c.class_names:
      feats["label"] = tfds.features.ClassLabel(names=list(c.class_names))
    if c.has_caption:
      feats["caption"] = tfds.features.Sequence(tfds.features.Text())
    if c.has_qa:
      feats["qa"] = tfds.features.Sequence({"question": tfds.features.Text(),
                                            "answer": tfds.features.Text()})
    return tfds.core.DatasetInfo(
        builder=self, description=f"A user's image folder ({c.layout} layout): {c.root}",
        features=tfds.features.FeaturesDict(feats),
        supervised_keys=("image", "label") if c.class_names else None,
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    self._skipped = list(self.scan.skipped)
    return {split: self._generate_examples(split, records) for split, records in self.scan.splits.items()}

  def _generate_examples(self, split: str, records: list):
    c = self.builder_config
    label_index = {n: i for i, n in enumerate(c.class_names)}

    def load(r):
      try:
        return load_image(os.path.join(c.root, r.path)), None
      except (BadRecord, OSError) as e:
        return None, f"{r.path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"

    count = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
      for start in range(0, len(records), 64):  # bounded memory: 64 images in flight
        chunk = records[start:start + 64]
        for r, (image, err) in zip(chunk, pool.map(load, chunk)):
          if err:
            self._skipped.append(err)
            continue
          ex = {"image": image, "path": r.path}
          if c.class_names:
            ex["label"] = label_index[r.label]
          if c.has_caption:
            ex["caption"] = r.captions
          if c.has_qa:
            ex["qa"] = {"question": [q for q, _ in r.qa], "answer": [a for _, a in r.qa]}
          count += 1
          yield r.path, ex
    if not count:
      raise UserError(f"split '{split}' of folder '{c.root}' has no readable images. Add readable "
                      f"images or remove that split.{listing(self._skipped)}")
    self.info.metadata["skipped_count"] = len(self._skipped)
    self.info.metadata["skipped"] = self._skipped[:KEPT_IN_METADATA]


@contextlib.contextmanager
def _quiet_tfds():
  """Hides tfds' warnings about a custom config (it prints the whole config) and a new folder."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def prepare(root: str, data_dir: str) -> Folder:
  """The prepared dataset of the folder at `root` in data_dir (built unless already there)."""
  if "://" not in data_dir:  # a local data_dir (gs://... is left as it is)
    data_dir = os.path.realpath(os.path.expanduser(data_dir))
  folder_scan = scan(root)
  if inside(data_dir, folder_scan.root):
    raise UserError(f"data_dir '{data_dir}' is inside the dataset folder '{folder_scan.root}'; "
                    f"the folder is never written to. Choose a --config.data_dir outside it.")
  with _quiet_tfds():
    def build(b, lock_fd):
      del lock_fd  # built in this process
      print(f"Preparing folder dataset {folder_scan.root} into {b.data_dir}", flush=True)
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))

    # Reading errors are skipped records: what fails here is writing (permissions, disk full).
    builder, built = prepared.prepare_once(lambda: Folder(folder_scan, data_dir), build,
                                           f"folder '{folder_scan.root}'", data_dir)
  for note in folder_scan.notes:
    log.warning("folder '%s': %s", folder_scan.root, note)
  skipped = builder.info.metadata.get("skipped") or []
  if skipped:
    count = builder.info.metadata.get("skipped_count", len(skipped))
    log.warning("folder '%s': %d record(s) %s skipped (fix or remove them):%s", folder_scan.root, count,
                "were" if built else "had been", listing(skipped, count)[len(" Skipped:"):])
  return builder
