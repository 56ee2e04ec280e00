"""Array and layer-stack helpers shared by the HF mapping modules (numpy only, no torch needed)."""

from typing import Mapping

import numpy as np


def f32(x) -> np.ndarray:
  """A contiguous float32 numpy array of `x` (numpy, jax or torch)."""
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().numpy()
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def ln_from(sd, name) -> dict:
  """Our LayerNorm params from a state dict's `NAME.weight` / `NAME.bias`."""
  return {"scale": f32(sd[f"{name}.weight"]), "bias": f32(sd[f"{name}.bias"])}


def split_heads(w, b, num_heads):
  """A q/k/v projection [in, out] + bias [out] (out = heads x head_dim) in our head-major layout."""
  d = w.shape[0]
  return w.reshape(d, num_heads, -1), b.reshape(num_heads, -1)


def stack(trees: list):
  """Per-layer trees -> one tree with a leading layer axis (the layout of a scanned stack)."""
  if isinstance(trees[0], Mapping):
    return {k: stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def _index(tree, i):
  if isinstance(tree, Mapping):
    return {k: _index(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]


def unstacked_blocks(params: Mapping, probe=("ln1", "scale")) -> list:
  """The per-layer param trees of a stack: scanned (`layers`, leading axis) or unrolled (`layers_i`)."""
  if "layers" in params:
    depth = np.shape(params["layers"][probe[0]][probe[1]])[0]
    return [_index(params["layers"], i) for i in range(depth)]
  blocks, i = [], 0
  while f"layers_{i}" in params:
    blocks.append(_index(params[f"layers_{i}"], slice(None)))
    i += 1
  if not blocks:
    raise ValueError("params hold no layers ('layers' or 'layers_0')")
  return blocks


def stacked(blocks: list, scan_layers: bool) -> dict:
  """Per-layer trees -> `{"layers": stacked}` (scan) or `{"layers_i": block}` (unrolled)."""
  return {"layers": stack(blocks)} if scan_layers else {f"layers_{i}": b for i, b in enumerate(blocks)}
