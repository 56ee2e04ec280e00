"""Pure Flax linen modules (no training logic, no config access): layers, ViT, text towers, VLMs."""
