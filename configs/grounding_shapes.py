"""CPU recipe: grounding referring expressions on the embedded `shapes` dataset.

python -m vlm_jax.train --config configs/grounding_shapes.py --workdir /tmp/grounding_shapes \
    --config.init_from=/tmp/cappa_shapes
"the small red circle" -> the box of the one object it names, as 4 location tokens. The ViT
starts from a captioning run (`configs/cappa_shapes.py`; `init_include` takes its encoder only:
the decoder's vocabulary gains the 1024 location tokens); without init_from it trains from
scratch, far slower. Evaluation decodes greedily, constrained to one box, and reports
test/grounding_acc50 (IoU >= 0.5). `:tiny` is the few-second variant used by the tests.
"""

import os

from vlm_jax.config import recipe_module

cappa_shapes = recipe_module(os.path.join(os.path.dirname(__file__), "cappa_shapes.py"))


def get_config(arg: str = ""):
  c = cappa_shapes.get_config(arg)
  c.task = "grounding"
  c.input.text = ""
  c.input.ref_key = "refs/expression"
  c.input.ref_box_key = "refs/bbox"
  c.input.max_len = 16  # [BOS] expression [SEP] 4 locations EOS
  c.model.masked_pred_prob = 0.0
  c.model.loc_sigma = 16.0  # training targets a location token with a Gaussian of 16 bins (1 pixel at 64 px)
  c.init_include = "^img/"  # with --config.init_from=CAPTIONING_RUN: its encoder
  c.total_steps, c.eval_every_steps = 2500, 1250
  c.model.decoder.max_len = 24
  c.evals.decode_len = 5
  c.evals.constrained = True  # greedy decoding writes exactly 4 location tokens, then EOS
  if arg == "tiny":
    c.total_steps, c.eval_every_steps = 20, 10
  return c
