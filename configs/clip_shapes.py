"""CPU recipe: CLIP (softmax loss) image-text training on the embedded `shapes` dataset.

python -m vlm_jax.train --config configs/clip_shapes.py --workdir /tmp/clip_shapes
Laid out as Hugging Face `CLIPModel`: ViT with a class token and a LayerNorm on the embeddings
(`pre_norm`, HF `pre_layrnorm`), pooled at the class token after the final LayerNorm; causal
text encoder pooled at the EOS token (`pool="last"`: the last non-pad token of `[BOS] text [EOS]`);
bias-free projections into a shared embedding; a learnable temperature (no bias). Same data,
schedule and metrics as configs/siglip_shapes.py. `:tiny` is the test variant.
"""

import math
import os

from vlm_jax.config import recipe_module

siglip_shapes = recipe_module(os.path.join(os.path.dirname(__file__), "siglip_shapes.py"))


def get_config(arg: str = ""):
  c = siglip_shapes.get_config(arg)
  c.model.loss = "softmax"
  c.model.image.update(dict(pool="cls", pre_norm=True))
  c.model.text.update(dict(causal=True, pool="last"))
  c.model.embed_dim = c.model.image.width
  c.model.image_proj = True
  c.model.text_proj = True
  c.model.proj_bias = False
  c.model.logit_scale_init = math.log(1 / 0.07)
  return c
