"""Hugging Face import / export: one module per model family, mapping our Flax parameter trees to
and from the weight layouts (names and shapes) of the matching `transformers` PyTorch classes.
Mappings work on numpy arrays only; torch is needed just to build or run the HF models."""
