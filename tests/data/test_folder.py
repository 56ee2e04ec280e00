"""Users' own folders as tfds datasets: both layouts, bad records skipped and counted, image modes
converted, caching by path + fingerprint, the user's folder never written, and a CLI training run."""

import hashlib
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import jax

from vlm_jax import config
from vlm_jax.data import features, pipeline, sources, tokenizer as tokenizer_lib, tokenizer_source
from vlm_jax.data.builders import folder, folder_scan
from vlm_jax.errors import UserError
from vlm_jax.runtime import build

from conftest import REPO

COLORS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def _png(path, rgb=None, size=(24, 20), seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 40, (size[1], size[0], 3)) + np.array(rgb or (128, 128, 128))
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def _jpeg_bytes(size=(32, 24)):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
      buf, format="JPEG")
  return buf.getvalue()


def _class_folder(root, per_split=(("train", 8), ("validation", 3), ("test", 3))):
  for split, n in per_split:
    for c, rgb in COLORS.items():
      for i in range(n):
        _png(os.path.join(root, split, c, f"{i}.png"), rgb, seed=i)


def _snapshot(root):
  """Every entry under root with its size, mtime and content hash."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      p = os.path.join(d, name)
      st = os.lstat(p)
      digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) and not os.path.islink(p) else ""
      out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def test_class_folders_skip_bad_files_with_a_warning(tmp_path, caplog):
  root, dd = str(tmp_path / "pets"), str(tmp_path / "tfds")
  _class_folder(root)
  bad = os.path.join(root, "train", "red")
  open(os.path.join(bad, "empty.jpg"), "wb").close()
  jpeg = _jpeg_bytes()
  open(os.path.join(bad, "truncated.jpg"), "wb").write(jpeg[:len(jpeg) // 2])
  open(os.path.join(bad, "notes.png"), "w").write("not an image")
  open(os.path.join(bad, "README.txt"), "w").write("ignored: not an image extension")
  _png(os.path.join(root, "stray.png"))  # beside the split folders: no split
  _png(str(tmp_path / "outside.png"))
  os.symlink(str(tmp_path / "outside.png"), os.path.join(bad, "link.png"))
  before = _snapshot(root)
  with caplog.at_level(logging.WARNING):
    builder = sources.open_source(f"folder:{root}", dd)
  assert _snapshot(root) == before  # nothing written into the user's folder
  info = sources.data_info(builder)
  assert info.class_names == ["blue", "green", "red"] and info.num_classes == 3
  assert info.splits == {"train": 24, "validation": 9, "test": 9}
  skipped = builder.info.metadata["skipped"]
  assert builder.info.metadata["skipped_count"] == 5
  reasons = "\n".join(skipped)
  for expected in ("train/red/empty.jpg: empty file (0 bytes)",
                   "train/red/truncated.jpg: not a readable image (OSError",
                   "train/red/notes.png: not a readable image (UnidentifiedImageError",
                   "stray.png: not inside a split folder",
                   "train/red/link.png: symlink leaves the folder"):
    assert expected in reasons, reasons
  warning = "\n".join(r.getMessage() for r in caplog.records)
  assert "5 record(s) were skipped" in warning and "train/red/empty.jpg" in warning
  examples = _examples(builder, "validation")
  for ex in examples:  # labels follow the sorted folder names; the pixels are the class colour
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (20, 24, 3)
    name = info.class_names[ex["label"]]
    assert ex["path"].decode().split("/")[1] == name
    np.testing.assert_allclose(ex["image"].reshape(-1, 3).mean(0), np.array(COLORS[name]) + 19.5, atol=4)


def test_image_modes_become_rgb_uint8_and_huge_images_are_capped(tmp_path, monkeypatch):
  def roundtrip(img, name, **save):
    path = str(tmp_path / name)
    img.save(path, **save)
    data = folder_scan.load_image(path)
    return data, np.asarray(Image.open(io.BytesIO(data)))

  gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
  _, out = roundtrip(Image.fromarray(gray, "L"), "gray.png")
  assert out.shape == (12, 20, 3) and (out == gray[..., None]).all()
  rgba = np.random.default_rng(0).integers(0, 255, (10, 14, 4), dtype=np.uint8)
  _, out = roundtrip(Image.fromarray(rgba, "RGBA"), "rgba.png")
  np.testing.assert_array_equal(out, rgba[..., :3])  # alpha dropped, as tf.io.decode_image does
  deep = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 257 * 16).astype(np.uint16)
  _, out = roundtrip(Image.fromarray(deep), "deep.png")
  np.testing.assert_array_equal(out[..., 0], (deep // 257).astype(np.uint8))
  _, out = roundtrip(Image.fromarray(gray, "L").convert("P"), "palette.gif")
  assert out.shape == (12, 20, 3)
  _, out = roundtrip(Image.new("CMYK", (9, 7), (0, 255, 255, 0)), "cmyk.jpg")
  assert out.shape == (7, 9, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60
  data, out = roundtrip(Image.new("RGB", (3000, 1200), (10, 200, 30)), "huge.png")
  assert out.shape == (410, 1024, 3) and data[:4] == b"\x89PNG"
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), (10, 200, 30), atol=1)
  data, out = roundtrip(Image.new("RGB", (2400, 4000), (200, 30, 30)), "huge.jpg", quality=90)
  assert out.shape == (1024, 614, 3) and data[:2] == b"\xff\xd8"
  jpeg = _jpeg_bytes()
  (tmp_path / "plain.jpg").write_bytes(jpeg)
  assert folder_scan.load_image(str(tmp_path / "plain.jpg")) == jpeg  # no needless re-encoding
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's decompression-bomb guard
  with pytest.raises(folder_scan.BadRecord, match="not a readable image .DecompressionBombError"):
    folder_scan.load_image(str(tmp_path / "huge.png"))


def test_flat_folder_is_one_train_split_with_numeric_class_order(tmp_path):
  root = str(tmp_path / "digits")
  for c in ("10", "2", "1"):
    _png(os.path.join(root, c, "deeper", "a.png"))  # images in nested folders count for the class
  s = folder_scan.scan(root)
  assert s.layout == "classes" and list(s.splits) == ["train"] and s.class_names == ("1", "2", "10")
  assert sorted(r.label for r in s.splits["train"]) == ["1", "10", "2"]


def _jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(r if isinstance(r, str) else json.dumps(r))
      f.write("\n")


def _caption_folder(tmp_path):
  root = str(tmp_path / "captions")
  names = []
  for i in range(12):
    name = f"img/{i:02d}.png"
    rgb = list(COLORS.values())[i % 3]
    _png(os.path.join(root, name), rgb, seed=i)
    names.append((name, list(COLORS)[i % 3]))
  _png(str(tmp_path / "secret.png"))
  os.symlink(str(tmp_path / "secret.png"), os.path.join(root, "img", "link.png"))
  row = lambda n, c: {"image": n, "caption": f"a {c} square", "question": "what color is it?", "answer": c}
  train = [row(n, c) for n, c in names[:9]]
  train[0]["caption"] = [train[0]["caption"], f"the {names[0][1]}\n one "]
  train.append({"image": names[1][0], "caption": "another reference"})  # merged with its first line
  train += ["{not json", {"caption": "no image"}, {"image": "/etc/passwd", "caption": "x"},
            {"image": "../secret.png", "caption": "x"}, {"image": "img/link.png", "caption": "x"},
            {"image": "img/missing.png", "caption": "x"},
            {"image": names[2][0], "question": "q?", "answer": "a"}]  # merged: has no caption of its own, fine
  _jsonl(os.path.join(root, "train.jsonl"), train)
  _jsonl(os.path.join(root, "test.jsonl"),
         [row(n, c) for n, c in names[9:]] + [{"image": names[9][0], "question": "is it big?", "answer": "no"},
                                              {"image": "img/00.png", "question": "only a question", "answer": "x"}])
  return root


def test_jsonl_captions_and_qa_feed_captioning_and_vqa_pipelines(tmp_path, caplog):
  root, dd = _caption_folder(tmp_path), str(tmp_path / "tfds")
  before = _snapshot(root)
  with caplog.at_level(logging.WARNING):
    builder = sources.open_source(f"folder:{root}", dd)
  assert _snapshot(root) == before
  assert set(builder.info.features) == {"image", "path", "caption", "qa"}
  assert sources.data_info(builder).splits == {"train": 9, "test": 3}
  reasons = "\n".join(builder.info.metadata["skipped"])
  for expected in ("train.jsonl line 11: not JSON", "train.jsonl line 12: missing 'image'",
                   "train.jsonl line 13: image path '/etc/passwd' is absolute",
                   "train.jsonl line 14: image path '../secret.png' leaves the folder",
                   "train.jsonl line 15: image path 'img/link.png' is a symlink that leaves the folder",
                   "train.jsonl line 16: image 'img/missing.png' does not exist",
                   "test 'img/00.png': missing 'caption'"):
    assert expected in reasons, reasons
  assert builder.info.metadata["skipped_count"] == 7
  ex = {e["path"].decode(): e for e in _examples(builder, "train")}
  assert [c.decode() for c in ex["img/00.png"]["caption"]] == ["a blue square", "the blue one"]
  assert [c.decode() for c in ex["img/01.png"]["caption"]] == ["a green square", "another reference"]
  assert [q.decode() for q in ex["img/02.png"]["qa"]["question"]] == ["what color is it?", "q?"]

  tok = tokenizer_source.tokenizer_for_dataset(f"folder:{root}", dd, vocab_size=64)
  assert tok.decode(tok.encode("a green square")) == "a green square"
  assert os.path.dirname(tokenizer_source.cache_path(builder, 64)) == builder.data_dir  # cached with the data
  cfg = config.load(os.path.join(REPO, "configs/cappa_shapes.py:tiny"))
  inp = cfg.input
  inp.data, inp.image_size, inp.max_len, inp.vocab_size = f"folder:{root}", 16, 12, 64
  cfg.data_dir, cfg.model.encoder.patch_size, cfg.evals.splits = dd, 8, "test"
  s = build(cfg, devices=jax.devices()[:1])  # the captioning recipe, unchanged but for the data
  assert s.task.tokenizer.to_json() == tok.to_json() and s.data_info.splits == {"train": 9, "test": 3}
  batch = next(pipeline.train_batches(inp, dd, 0, 4, features=s.task.features(inp), encode=s.task.encode))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["tokens"].shape == (4, 12)
  assert (batch["tokens"][:, 0] == tok.bos_id).all()
  with s.context():  # the loss traces with this batch (compiling a step would cost ~15 s of CPU)
    loss, _ = jax.eval_shape(s.task.loss_fn, s.abstract_state.params, batch, jax.random.PRNGKey(0))
  assert loss.shape == () and loss.dtype == np.float32
  n, batches = pipeline.eval_batches(inp, dd, "test", 8, features=(features.TextPairs(inp.question_key, inp.answer_key),))
  rows = list(batches)
  assert n == 1 and int(rows[0]["_mask"].sum()) == 4  # 3 images, one with two QA pairs
  answers = tokenizer_lib.texts(rows[0], "answer")[:4]
  assert sorted(answers) == sorted(["blue", "green", "red", "no"])


def test_changed_folder_is_prepared_again_and_data_dir_stays_outside(tmp_path):
  root, dd = str(tmp_path / "f"), str(tmp_path / "tfds")
  _class_folder(root, (("train", 2),))
  first = folder.prepare(root, dd)
  assert folder.prepare(root, dd).data_dir == first.data_dir  # unchanged: reused
  _png(os.path.join(root, "blue", "new.png"))
  second = folder.prepare(root, dd)
  assert second.data_dir != first.data_dir and second.info.splits["train"].num_examples == 7
  assert os.path.isdir(first.data_dir)  # the older copy is left alone (a running job may read it)
  with pytest.raises(UserError, match="is inside the dataset folder .* Choose a --config.data_dir outside"):
    folder.prepare(root, os.path.join(root, "cache"))
  assert not os.path.exists(os.path.join(root, "cache"))


def test_nothing_valid_is_one_clear_error(tmp_path):
  dd = str(tmp_path / "tfds")
  with pytest.raises(UserError, match="folder '.*nowhere' does not exist"):
    sources.open_source(f"folder:{tmp_path}/nowhere", dd)
  with pytest.raises(UserError, match="names no folder"):
    sources.open_source("folder:", dd)
  empty = tmp_path / "empty"
  (empty / "cats").mkdir(parents=True)
  (empty / "cats" / "notes.txt").write_text("no images here")
  with pytest.raises(UserError, match="holds no usable images. Expected class subfolders"):
    folder.prepare(str(empty), dd)
  broken = tmp_path / "broken"
  _class_folder(str(broken), (("train", 1),))
  for c in COLORS:
    (broken / "test" / c).mkdir(parents=True)
    (broken / "test" / c / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  with pytest.raises(UserError, match=r"split 'test' of folder .* has no readable images. .*Skipped: test/"):
    folder.prepare(str(broken), dd)
  assert not os.path.exists(os.path.join(dd, "folder")) or not any(
      "incomplete" in n for _, ds, _ in os.walk(os.path.join(dd, "folder")) for n in ds)


def test_cli_trains_the_tiny_recipe_on_a_folder(tmp_path):
  root, wd = str(tmp_path / "colors"), str(tmp_path / "run")
  _class_folder(root, (("train", 12), ("validation", 4), ("test", 4)))
  open(os.path.join(root, "train", "red", "broken.jpg"), "wb").write(b"\xff\xd8\xff broken")
  before = _snapshot(root)
  r = subprocess.run(
      [sys.executable, "-m", "vlm_jax.train", "--config", "configs/vit_shapes.py:tiny", "--workdir", wd,
       f"--config.data_dir={tmp_path / 'tfds'}", f"--config.input.data=folder:{root}",
       "--config.total_steps=6", "--config.eval_every_steps=6", "--config.checkpoint_every_steps=6",
       "--config.log_every_steps=2", "--config.evals.pictures=0", "--config.batch_size=16"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "1 record(s) were skipped" in r.stderr and "train/red/broken.jpg" in r.stderr
  rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
  last = rows[-1]
  assert last["step"] == 6 and "validation/accuracy" in last
  # Counted over the 12 test images only (3 classes x 4), none of the evaluation batch's padding rows.
  assert last["test/accuracy"] * 12 == pytest.approx(round(last["test/accuracy"] * 12), abs=1e-6), last
  losses = [x["train/loss"] for x in rows if "train/loss" in x]
  assert len(losses) == 3 and all(np.isfinite(losses))
  info = json.load(open(os.path.join(wd, "data_info.json")))
  assert info["class_names"] == ["blue", "green", "red"] and info["splits"]["train"] == 36
  assert _snapshot(root) == before
