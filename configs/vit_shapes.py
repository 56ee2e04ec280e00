"""CPU quickstart: a small ViT classifying the embedded `shapes` dataset (24 classes).

python -m vlm_jax.train --config configs/vit_shapes.py --workdir /tmp/vit_shapes
Reaches test/accuracy >= 0.95 in a few minutes on 2 CPU cores (see BENCHMARKS.md).
`--config configs/vit_shapes.py:tiny` is the few-second variant used by the tests.
"""

from vlm_jax.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.task = "classification"
  c.seed = 0
  c.total_steps = 1500
  c.batch_size = 128
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 250

  c.input.data = "shapes"
  c.input.image_size = 64
  c.input.flip = True
  c.input.shuffle_buffer_size = 20_000

  c.model.patch_size = 16
  c.model.width = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 256
  c.model.pool = "gap"
  c.model.dropout = 0.0
  c.model.scan_layers = False  # unrolled compiles to ~20% faster CPU code at depth 4
  c.model.remat = "none"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.dtype_mm = "float32"  # "bfloat16": bf16 matmul operands, f32 accumulation (models.precision)
  c.model.attention = "auto"  # "xla" | "cudnn" (GPU flash attention): vlm_jax.kernels.ATTENTION

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4

  c.evals.splits = "validation,test"
  c.evals.batch_size = 500

  if arg == "tiny":
    c.input.data = "shapes/tiny"
    c.input.image_size = 32
    c.total_steps = 20
    c.batch_size = 32
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.model.patch_size = 8
    c.model.width = 32
    c.model.scan_layers = True
    c.model.depth = 2
    c.model.num_heads = 2
    c.model.mlp_dim = 64
    c.evals.batch_size = 64
    c.evals.pictures = 8
  elif arg:
    raise ValueError(f"unknown variant '{arg}'; use '' or 'tiny'")
  return c
