"""Local tfds builders (`shapes`, `folder`); importing a builder's module registers it.

Nothing is imported here: `python -m vlm_jax.data.builders.shapes_build` must start without
TensorFlow (see shapes_build).
"""
