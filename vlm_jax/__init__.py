"""vlm_jax: one JAX/Flax trainer for vision-language models (classification, captioning/VQA, contrastive)."""

import os

# TensorFlow (used only by the input pipeline) logs INFO lines at import; keep the console readable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
