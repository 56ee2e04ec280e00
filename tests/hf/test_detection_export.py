"""Detection and grounding runs exported to transformers: `VisionEncoderDecoderModel.generate`
from the prompt ("detect", or a referring expression) gives the boxes `vlm_jax.predict` prints,
through the README's few lines; the exported tokenizer keeps the location tokens."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the PyTorch parity tests run in the Python 3.11 CI lane (requirements-lowest.txt)")
transformers = pytest.importorskip("transformers")

from vlm_jax import config, predict, train  # noqa: E402
from vlm_jax.hf import export  # noqa: E402

from conftest import REPO  # noqa: E402


def _boxes_from_text(text: str, height: int, width: int) -> list:
  """The README's recipe: every 4 <locNNNN> tokens are y1 x1 y2 x2 in 1024 bins of the image;
  empty boxes (y2 <= y1 or x2 <= x1) are dropped."""
  bins = [int(b) for b in re.findall(r"<loc(\d{4})>", text)]
  boxes = [bins[i:i + 4] for i in range(0, len(bins) - 3, 4)]
  return [[round(b / 1023 * s, 1) for b, s in zip(box, (height, width, height, width))]
          for box in boxes if box[2] > box[0] and box[3] > box[1]]


@pytest.mark.parametrize("task_name,prompt_text", [("detection", "detect"), ("grounding", "the large square")])
def test_hf_generate_gives_the_boxes_predict_prints(data_dir, tmp_path, task_name, prompt_text):
  cfg = config.load(os.path.join(REPO, f"configs/{task_name}_shapes.py:tiny"))
  cfg.data_dir, cfg.total_steps, cfg.checkpoint_every_steps, cfg.evals.splits = data_dir, 80, 80, ""
  cfg.optimizer.learning_rate = 3e-3
  workdir = str(tmp_path / "run")
  train.train(cfg, workdir)
  out = str(tmp_path / "hf")
  export.export_workdir(workdir, out)

  # Test-split scenes, at the model's size and stretched to other sizes (boxes are printed in pixels
  # of the file's own size).
  import tensorflow_datasets as tfds
  from vlm_jax.data.builders import shapes  # noqa: F401  registers the builder
  scenes = [ex["image"] for ex in tfds.as_numpy(tfds.builder("shapes/tiny", data_dir=data_dir).as_dataset(split="test").take(4))]
  paths = []
  for i, (img, (h, w)) in enumerate(zip(scenes, [(32, 32), (48, 80), (64, 40), (32, 32)])):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(img).resize((w, h), Image.BILINEAR).save(paths[i])

  run = export.load_run(workdir)[0]
  task = run.task
  images = np.stack([predict.load_image(p, cfg.input) for p in paths])
  ours_tokens = np.asarray(task.predict_fn(run.params, task.predict_inputs(images, prompt_text if task_name == "grounding" else ""))["tokens"])
  model = transformers.VisionEncoderDecoderModel.from_pretrained(out).eval()
  processor = transformers.AutoImageProcessor.from_pretrained(out)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.convert_tokens_to_ids("<loc0000>") == task.loc_ids[0]
  # The README's prompt: [BOS] text [SEP], as for a VQA question.
  prompt = [hf_tok.bos_token_id] + hf_tok(prompt_text, add_special_tokens=False).input_ids + [hf_tok.sep_token_id]
  if task_name == "detection":
    assert prompt == list(task.prompt_ids[:task.prompt_len])
  extra = {}
  if task_name == "grounding":  # the recipe decodes constrained: 4 location tokens, then EOS
    locs = list(range(hf_tok.convert_tokens_to_ids("<loc0000>"), hf_tok.convert_tokens_to_ids("<loc1023>") + 1))
    extra["prefix_allowed_tokens_fn"] = lambda _, ids: locs if len(ids) < len(prompt) + 4 else [hf_tok.eos_token_id]
  printed = predict.predict(workdir, paths, {"refer": prompt_text} if task_name == "grounding" else None)
  for i, (p, (_, ours, err)) in enumerate(zip(paths, printed)):
    assert err is None
    with Image.open(p) as im:
      h, w = im.height, im.width
      pixels = processor(images=im, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
      ids = model.generate(pixel_values=pixels, decoder_input_ids=torch.tensor([prompt]),
                           max_new_tokens=task.decode_len, **extra)[0].numpy()
    generated = ids[len(prompt):]
    np.testing.assert_array_equal(generated, ours_tokens[i][:len(generated)])
    assert (ours_tokens[i][len(generated):] == task.tokenizer.pad_id).all()
    text = hf_tok.decode(generated, skip_special_tokens=True)
    # Box for box: what predict printed is what the README's lines read from transformers' output.
    assert [o["box"] for o in json.loads(ours)] == _boxes_from_text(text, h, w), (ours, text)
