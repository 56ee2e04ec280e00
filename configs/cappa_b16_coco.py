"""Real-scale recipe: CapPa-style captioner, ViT-B/16 encoder + 6-layer decoder, on COCO captions.

Needs `coco_captions` (tfds; Karpathy splits train/restval/val/test) prepared in `data_dir` and
accelerators, e.g. a Cloud TPU v4-32 or an 8-GPU host:
  python -m vlm_jax.train --config configs/cappa_b16_coco.py --workdir /gcs/BUCKET/cappa_b16 \\
      --config.data_dir=gs://BUCKET/tensorflow_datasets
Start the encoder from an ImageNet run (its ViT goes under the captioner's 'img/' tower):
      --config.init_from=/gcs/BUCKET/vit_b16 --config.init_prefix=img/ \\
      --config.init_include='^img/(embedding|pos_embedding|encoder)/'
A WordPiece tokenizer is trained on the training captions the first time (cached next to the
data and copied into the workdir). Reports val/test BLEU-4, CIDEr and perplexity.
"""

from ml_collections import ConfigDict

from vlm_jax.config import base_config

COCO_TRAIN = 113_287  # Karpathy train + restval images


def get_config(arg: str = ""):
  c = base_config()
  c.task = "captioning"
  c.batch_size = 512
  epochs = 30
  c.total_steps = epochs * COCO_TRAIN // c.batch_size
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.mesh = "data=1,fsdp=-1,tensor=1"
  # `python -m vlm_jax.compile` targets (the trainer ignores this block): the TPU slices this
  # recipe is sized for, and what the dataset would tell the model.
  c.compile = ConfigDict(dict(topologies="v5p-32"))

  c.input.data = "coco_captions"
  c.input.train_split = "train+restval"
  c.input.caption_key = "captions/text"  # five references per image; training samples one
  c.input.text = "caption"
  c.input.image_size = 224
  c.input.random_crop_scale = (0.5, 1.0)
  c.input.flip = False  # captions say "left" and "right"
  c.input.max_len = 64
  c.input.vocab_size = 16_000
  c.input.shuffle_buffer_size = 50_000
  c.input.prefetch = 4

  c.model.masked_pred_prob = 0.75  # CapPa: most sequences use parallel prediction
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.dtype_mm = "float32"  # "bfloat16": bf16 matmul operands, f32 accumulation (models.precision)
  c.model.attention = "auto"  # "xla" | "cudnn" (GPU flash attention): vlm_jax.kernels.ATTENTION
  c.model.encoder = ConfigDict(dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                                    pool="none", ln_eps=1e-6, scan_layers=True, remat="dots_no_batch"))
  c.model.decoder = ConfigDict(dict(width=768, depth=6, num_heads=12, mlp_dim=3072, max_len=64,
                                    ln_eps=1e-5, gelu_approximate=True, tie_embeddings=True,
                                    scan_layers=True, remat="dots_no_batch", dropout=0.1))

  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 1000
  c.optimizer.weight_decay = 1e-4
  c.optimizer.b2 = 0.999

  c.evals.splits = "val,test"
  c.evals.batch_size = 512
  c.evals.decode = "beam"
  c.evals.beam_size = 4
  c.evals.decode_len = 40
  if arg:
    raise ValueError(f"unknown variant '{arg}'; use ''")
  return c
