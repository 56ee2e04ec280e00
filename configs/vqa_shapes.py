"""CPU recipe: VQA fine-tuning on `shapes`, initialised from a captioning run.

python -m vlm_jax.train --config configs/vqa_shapes.py --workdir /tmp/vqa_shapes \
    --config.init_from=/tmp/cappa_shapes
The question is a prompt (`[BOS] question [SEP]`), the loss covers only the answer; evaluation
generates answers and reports test/vqa_accuracy. The tokenizer must be the captioning run's
(`input.tokenizer` defaults to INIT_FROM/tokenizer.json when init_from is set).
"""

import os

from vlm_jax.config import recipe_module

cappa_shapes = recipe_module(os.path.join(os.path.dirname(__file__), "cappa_shapes.py"))


def get_config(arg: str = ""):
  c = cappa_shapes.get_config(arg)
  c.input.text = "qa"
  c.model.masked_pred_prob = 0.0
  c.total_steps = 20 if arg == "tiny" else 2000
  c.eval_every_steps = 10 if arg == "tiny" else 1000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 1 if arg == "tiny" else 100
  c.evals.decode_len = 4
  if arg != "tiny":
    # A prompt + answer is at most ~18 tokens: shorter rows than captioning's halve the decoder's
    # work, and the saved time buys 2000 steps in the 10-minute budget.
    c.input.max_len = 24
    c.evals.splits = "test"  # 8000 question/answer pairs per split; `vlm_jax.evaluate` adds others
  return c
