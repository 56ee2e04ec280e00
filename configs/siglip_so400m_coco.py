"""Real-scale recipe: SigLIP So400m/14 at 224 px, image-text training on COCO captions, 256 chips.

The shape-optimised ViT of the SigLIP So400m paper (Alabdulmohsin et al., "Getting ViT in Shape",
2023): width 1152, depth 27, MLP 4304, 16 heads, patch 14, 224 px (256 patches), MAP pooling; a
text encoder of the same shape; the sigmoid loss over a global batch of 16384. Needs
`coco_captions` prepared in `data_dir` (or point `input.data` at your own folder of images and
captions, `folder:/path`), and a 256-chip slice such as v5p-512:
  python -m vlm_jax.train --config configs/siglip_so400m_coco.py --workdir /gcs/BUCKET/so400m \\
      --config.data_dir=/gcs/BUCKET/tensorflow_datasets
Width 1152 = 9 x 128 splits over at most 128 FSDP shards, and a v5p-512 (4x8x8 chips) lays out
64-way groups on whole torus axes: the 256 chips are 4 data-parallel replicas of 64-way FSDP.
"""

import os

from ml_collections import ConfigDict

from vlm_jax.config import recipe_module

siglip_b16 = recipe_module(os.path.join(os.path.dirname(__file__), "siglip_b16_coco.py"))

SO400M = dict(width=1152, depth=27, num_heads=16, mlp_dim=4304)


def get_config(arg: str = ""):
  c = siglip_b16.get_config(arg)
  c.batch_size = 16_384
  epochs = 100
  c.total_steps = epochs * siglip_b16.COCO_TRAIN // c.batch_size
  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.mesh = "data=4,fsdp=64,tensor=1"
  c.compile = ConfigDict(dict(topologies="v5p-512"))

  c.model.image = ConfigDict(dict(patch_size=14, **SO400M, pool="map", ln_eps=1e-6, gelu_approximate=True,
                                  scan_layers=True, remat="dots_no_batch"))
  c.model.text = ConfigDict(dict(**SO400M, causal=False, pool="last_position", ln_eps=1e-6,
                                 gelu_approximate=True, scan_layers=True, remat="dots_no_batch"))
  c.optimizer.warmup_steps = 100
  c.evals.batch_size = 4096
  return c
