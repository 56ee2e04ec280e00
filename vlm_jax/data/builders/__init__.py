"""Local tfds builders; importing this package registers them (`shapes`)."""
from vlm_jax.data.builders import shapes  # noqa: F401  (registers the builder)
