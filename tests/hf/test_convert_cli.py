"""tools/convert_to_hf.py on a captioner trained a few steps by the trainer: the exported folder
captions images in transformers exactly as `vlm_jax.predict` does (same tokens), in a python that
cannot import vlm_jax; the image processor reproduces our eval preprocessing; bad inputs give one
clear error each and overwrite nothing.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the PyTorch parity tests run in the Python 3.11 CI lane (requirements-lowest.txt)")
transformers = pytest.importorskip("transformers")

from vlm_jax import config, decode, predict, train  # noqa: E402
from vlm_jax.errors import UserError  # noqa: E402
from vlm_jax.hf import export  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """A cappa_shapes:tiny run trained 3 steps, exported by the CLI; PNG files of the model's size
  (32 x 32) and of odd sizes to be resized: smaller, larger, wide, tall."""
  root = tmp_path_factory.mktemp("cli")
  cfg = config.load(os.path.join(REPO, "configs/cappa_shapes.py:tiny"))
  with cfg.unlocked():
    cfg.data_dir, cfg.total_steps, cfg.checkpoint_every_steps, cfg.evals.splits = data_dir, 3, 3, ""
  workdir = str(root / "run")
  train.train(cfg, workdir)
  out = str(root / "hf")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools/convert_to_hf.py"), "--workdir", workdir,
                         "--out", out], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Wrote VisionEncoderDecoderModel (step 3)" in proc.stdout
  rng = np.random.default_rng(0)
  paths = []
  for i, (h, w) in enumerate([(32, 32), (32, 32), (45, 37), (17, 23), (30, 101), (120, 29)]):
    smooth = Image.fromarray((rng.random((h // 4 + 1, w // 4 + 1, 3)) * 255).astype(np.uint8)).resize((w, h))
    paths.append(str(root / f"img{i}.png"))
    smooth.save(paths[-1])
  return workdir, out, paths


def _hf_pixels(out, paths):
  ip = transformers.AutoImageProcessor.from_pretrained(out)
  return ip(images=[Image.open(p) for p in paths], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


def test_image_processor_reproduces_eval_preprocessing(run):
  workdir, out, paths = run
  inp = config.from_json(open(os.path.join(workdir, "config.json")).read()).input
  ours = np.stack([predict.load_image(p, inp) for p in paths])
  hf = _hf_pixels(out, paths)
  assert hf.shape == ours.shape
  diff = np.abs(ours - hf).reshape(len(paths), -1).max(1)
  print("max |pixel diff| per image:", diff)
  # Our resize is Pillow's, rounding included; only float32 normalisation order may differ.
  assert diff.max() <= 1e-6


def test_hf_generate_equals_predict_token_for_token(run):
  workdir, out, paths = run
  r, _ = export.load_run(workdir)
  pixels = _hf_pixels(out, paths)  # equal to ours (test above), resized ones included
  tok = r.task.tokenizer
  ours = np.asarray(decode.greedy(r.task.model, r.params, pixels, max_len=r.task.decode_len, bos_id=tok.bos_id,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id))
  model = transformers.VisionEncoderDecoderModel.from_pretrained(out).eval()
  with torch.no_grad():
    hf = model.generate(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
  n = hf.shape[1] - 1
  np.testing.assert_array_equal(ours[:, :n], hf[:, 1:])
  texts = [t for _, t, _ in predict.predict(workdir, paths)]
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert texts == [" ".join(t.split()) for t in hf_tok.batch_decode(hf, skip_special_tokens=True)]


README_SCRIPT = textwrap.dedent("""
  import importlib.util, sys
  assert importlib.util.find_spec("vlm_jax") is None, "vlm_jax must not be importable here"
  from PIL import Image
  from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
  d, image = sys.argv[1], sys.argv[2]
  model, processor, tokenizer = (c.from_pretrained(d) for c in (VisionEncoderDecoderModel, AutoImageProcessor, AutoTokenizer))
  ids = model.generate(**processor(images=Image.open(image), return_tensors="pt"))
  print("CAPTION:" + tokenizer.decode(ids[0], skip_special_tokens=True))
""")


def test_readme_recipe_runs_without_vlm_jax(run, tmp_path):
  workdir, out, paths = run
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["HF_HUB_OFFLINE"] = "1"
  proc = subprocess.run([sys.executable, "-c", README_SCRIPT, out, paths[0]], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  caption = proc.stdout.split("CAPTION:", 1)[1].strip()
  assert " ".join(caption.split()) == predict.predict(workdir, paths[:1])[0][1]


def test_bad_inputs_give_one_message_and_overwrite_nothing(run, tmp_path):
  workdir, out, _ = run
  empty = tmp_path / "untrained"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  with pytest.raises(UserError, match=r"no checkpoint in .*; train first"):
    export.export_workdir(str(empty), str(tmp_path / "o1"))
  assert not (tmp_path / "o1").exists()
  with pytest.raises(UserError, match=r"is not a training workdir"):
    export.export_workdir(str(tmp_path), str(tmp_path / "o2"))
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match=r"is not empty \(nothing was written\).*--overwrite"):
    export.export_workdir(workdir, str(busy))
  assert [p.name for p in busy.iterdir()] == ["keep.txt"]
  before = json.load(open(os.path.join(out, "config.json")))
  r = export.export_workdir(workdir, str(busy), step=3, overwrite=True)
  assert r["class"] == "VisionEncoderDecoderModel" and not (busy / "keep.txt").exists()
  assert json.load(open(busy / "config.json")) == before
  with pytest.raises(UserError, match=r"no checkpoint at step 7 .*steps: \[3\]"):
    export.export_workdir(workdir, str(tmp_path / "o3"), step=7)
