"""Real-scale recipe: SigLIP B/16 image-text training on COCO captions from a tfds data_dir.

Needs `coco_captions` (Karpathy splits) prepared in `data_dir` and accelerators, e.g.:
  python -m vlm_jax.train --config configs/siglip_b16_coco.py --workdir /gcs/BUCKET/siglip_coco \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
SigLIP-B/16 shapes laid out as Hugging Face `SiglipModel` (ViT-B/16 without class token, MAP
head; 12-layer text encoder pooled at the last position with a Linear head; logit scale and
bias), bf16 compute, FSDP over all devices, the sigmoid loss over the global batch as a ring
across the batch shards. A WordPiece tokenizer is trained on the train captions on first use.
Evaluation: recall@1/5/10 both ways on the 5k-image Karpathy test split (one caption per image:
the first reference; identical captions count as matches).
"""

import math

from ml_collections import ConfigDict

from vlm_jax.config import base_config

COCO_TRAIN = 82_783 + 30_504  # train + restval (Karpathy)


def get_config(arg: str = ""):
  c = base_config()
  c.task = "contrastive"
  c.batch_size = 4096
  epochs = 40
  c.total_steps = epochs * COCO_TRAIN // c.batch_size
  c.log_every_steps = 20
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.mesh = "data=1,fsdp=-1,tensor=1"
  # `python -m vlm_jax.compile` targets (the trainer ignores this block): the TPU slices this
  # recipe is sized for, and what the dataset would tell the model.
  c.compile = ConfigDict(dict(topologies="v5p-64"))

  c.input.data = "coco_captions"
  c.input.train_split = "train+restval"
  c.input.text = "caption"
  c.input.caption_key = "captions/text"
  c.input.image_size = 224
  c.input.random_crop_scale = (0.5, 1.0)
  c.input.flip = True
  c.input.max_len = 64
  c.input.vocab_size = 32_000
  c.input.shuffle_buffer_size = 50_000
  c.input.prefetch = 4

  c.model.loss = "sigmoid"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.dtype_mm = "float32"  # "bfloat16": bf16 matmul operands, f32 accumulation (models.precision)
  c.model.attention = "auto"  # "xla" | "cudnn" (GPU flash attention): vlm_jax.kernels.ATTENTION
  c.model.image = ConfigDict(dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pool="map",
                                  ln_eps=1e-6, gelu_approximate=True, scan_layers=True, remat="dots_no_batch"))
  c.model.text = ConfigDict(dict(width=768, depth=12, num_heads=12, mlp_dim=3072, causal=False,
                                 pool="last_position", ln_eps=1e-6, gelu_approximate=True, scan_layers=True,
                                 remat="dots_no_batch"))
  c.model.embed_dim = 0
  c.model.image_proj = False
  c.model.text_proj = True
  c.model.proj_bias = True
  c.model.logit_scale_init = math.log(10.0)
  c.model.logit_bias_init = -10.0
  c.model.text_init = ""
  c.model.image_init = ""

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 1e-4
  c.optimizer.b2 = 0.95

  c.evals.splits = "val,test"
  c.evals.batch_size = 1024
  c.evals.pictures = 16
  return c
