"""CPU recipe: object detection as a sequence on the embedded `shapes` dataset.

python -m vlm_jax.train --config configs/detection_shapes.py --workdir /tmp/detection_shapes \
    --config.init_from=/tmp/cappa_shapes
"detect" -> every object as 4 location tokens (y1 x1 y2 x2, 1024 bins) and its shape name, in a
random order per step (Pix2Seq). Evaluation decodes greedily and reports test/map and
test/map50 (COCO mAP by pycocotools). `:tiny` is the few-second variant used by the tests.
"""

import os

from vlm_jax.config import recipe_module

cappa_shapes = recipe_module(os.path.join(os.path.dirname(__file__), "cappa_shapes.py"))


def get_config(arg: str = ""):
  c = cappa_shapes.get_config(arg)
  c.task = "detection"
  c.input.text = ""
  c.input.boxes_key = "objects/bbox"
  c.input.object_label_key = "objects/shape"
  c.input.max_objects = 3  # shapes has 1 large and 0-2 small objects per image
  c.input.max_len = 32  # [BOS] detect [SEP] + 3 x (4 locations, a word, ';') + EOS
  c.model.masked_pred_prob = 0.0
  c.model.loc_sigma = 16.0  # training targets a location token with a Gaussian of 16 bins (1 pixel at 64 px)
  c.init_include = "^img/"  # with --config.init_from=CAPTIONING_RUN: its encoder
  c.model.decoder.max_len = 64
  c.evals.decode_len = 28
  if arg == "tiny":
    c.evals.decode_len = 24
  return c
