"""CPU recipe: SigLIP (sigmoid loss) image-text training on the embedded `shapes` dataset.

python -m vlm_jax.train --config configs/siglip_shapes.py --workdir /tmp/siglip_shapes
A two-tower model laid out as Hugging Face `SiglipModel`: ViT without class token, MAP head,
the head's output is the image embedding (no image projection); pre-LN text encoder pooled at
the last position (inputs padded to input.max_len) with a Linear head; learnable logit scale
and bias. The loss runs over the global batch as a ring across the data-parallel devices.
Reports test/i2t_recall@K, test/t2i_recall@K (K = 1, 5, 10) and test/zeroshot_accuracy (the 24
classes, "red circle", ..., through `evals.zeroshot_templates`). `:tiny` is the test variant.
"""

import math

from ml_collections import ConfigDict

from vlm_jax.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.task = "contrastive"
  c.total_steps = 2200
  c.batch_size = 256  # 128 x 3500 and 512 x 800 steps both scored lower in 15 min (BENCHMARKS.md)
  c.log_every_steps = 50
  c.eval_every_steps = 2200  # once, at the end: the 15-minute budget has no room for more
  c.checkpoint_every_steps = 550

  c.input.data = "shapes"
  c.input.text = "caption"
  c.input.image_size = 64
  c.input.flip = False  # captions say "left" and "right"
  c.input.max_len = 28  # the longest shapes caption is 26 tokens with BOS and EOS
  c.input.vocab_size = 1000
  c.input.shuffle_buffer_size = 20_000
  c.input.cache_decoded = True  # 245 MB of decoded images instead of decoding every epoch

  c.model.loss = "sigmoid"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.dtype_mm = "float32"  # "bfloat16": bf16 matmul operands, f32 accumulation (models.precision)
  c.model.attention = "auto"  # "xla" | "cudnn" (GPU flash attention): vlm_jax.kernels.ATTENTION
  c.model.image = ConfigDict(dict(patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=256, pool="map",
                                  ln_eps=1e-6, gelu_approximate=True, scan_layers=False, remat="none"))
  # One text layer: a second one costs ~28% of the step (28 tokens vs 16 image tokens), and the
  # steps it frees buy more R@1 in 15 minutes than its depth does (BENCHMARKS.md).
  c.model.text = ConfigDict(dict(width=128, depth=1, num_heads=4, mlp_dim=256, causal=False, pool="last_position",
                                 ln_eps=1e-6, gelu_approximate=True, scan_layers=False, remat="none"))
  c.model.embed_dim = 0  # = image width: SigLIP has no image projection
  c.model.image_proj = False
  c.model.text_proj = True
  c.model.proj_bias = True
  c.model.logit_scale_init = math.log(10.0)
  c.model.logit_bias_init = -10.0
  c.model.text_init = ""  # a Hugging Face BERT directory or package:NAME (see configs/lit_shapes.py)
  c.model.image_init = ""  # WORKDIR[:STEP] of a ViT classification run, loaded into img/

  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4

  c.evals.splits = "test"
  c.evals.batch_size = 500
  c.evals.zeroshot_templates = ("a large {}", "a big {}")

  if arg == "tiny":
    c.input.data = "shapes/tiny"
    c.input.image_size = 32
    c.total_steps, c.batch_size = 20, 32
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 5, 10, 10
    c.model.image.update(dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, scan_layers=True))
    c.model.text.update(dict(width=48, depth=1, num_heads=2, mlp_dim=64, scan_layers=True))
    c.evals.batch_size, c.evals.pictures = 64, 8
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; use '' or 'tiny'")
  return c
