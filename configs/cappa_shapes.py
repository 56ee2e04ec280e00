"""CPU recipe: CapPa-style captioning pretraining on the embedded `shapes` dataset.

python -m vlm_jax.train --config configs/cappa_shapes.py --workdir /tmp/cappa_shapes
A ViT encoder (all patch tokens) and a GPT-2-style decoder with cross-attention, trained with
teacher forcing plus CapPa parallel prediction (`model.masked_pred_prob`). Reports test/bleu4,
test/cider and test/perplexity. `:tiny` is the few-second variant used by the tests.
"""

from ml_collections import ConfigDict

from vlm_jax.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.task = "captioning"
  c.total_steps = 1500
  c.batch_size = 128
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 250

  c.input.data = "shapes"
  c.input.text = "caption"
  c.input.image_size = 64
  c.input.flip = False  # captions say "left" and "right"
  c.input.max_len = 40
  c.input.vocab_size = 1000
  c.input.shuffle_buffer_size = 20_000

  c.model.masked_pred_prob = 0.25
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.dtype_mm = "float32"  # "bfloat16": bf16 matmul operands, f32 accumulation (models.precision)
  c.model.attention = "auto"  # "xla" | "cudnn" (GPU flash attention): vlm_jax.kernels.ATTENTION
  c.model.encoder = ConfigDict(dict(patch_size=16, width=128, depth=4, num_heads=4, mlp_dim=256,
                                    pool="none", ln_eps=1e-6, scan_layers=False, remat="none"))
  # max_len covers a VQA prompt of input.max_len plus a short answer, so vqa_shapes fine-tunes this model.
  c.model.decoder = ConfigDict(dict(width=128, depth=2, num_heads=4, mlp_dim=256, max_len=48, ln_eps=1e-5,
                                    gelu_approximate=True, tie_embeddings=True, scan_layers=False,
                                    remat="none", dropout=0.0))

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 1e-4

  c.evals.splits = "validation,test"
  c.evals.batch_size = 500
  c.evals.decode = "greedy"

  if arg == "tiny":
    c.input.data = "shapes/tiny"
    c.input.image_size = 32
    c.total_steps, c.batch_size = 20, 32
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 5, 10, 10
    c.model.encoder.update(dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, scan_layers=True))
    c.model.decoder.update(dict(width=32, depth=2, num_heads=2, mlp_dim=48, scan_layers=True))
    c.evals.batch_size, c.evals.pictures, c.evals.decode_len = 64, 8, 12
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; use '' or 'tiny'")
  return c
