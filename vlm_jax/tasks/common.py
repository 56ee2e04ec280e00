"""Pieces shared by tasks: config -> module kwargs, masked means."""

import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.layers import ATTENTION
from vlm_jax.models.precision import MATMUL, MM_DTYPES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def module_kwargs(model_cfg, exclude=()) -> dict:
  """A config's `model` ConfigDict (or a dict) as keyword arguments of a Flax module (dtype names resolved)."""
  d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  kw = {k: v for k, v in d.items() if k not in exclude}
  for key in ("dtype", "param_dtype", "dtype_mm"):
    if key in kw:
      allowed = MM_DTYPES if key == "dtype_mm" else DTYPES
      if kw[key] not in allowed:
        raise UserError(f"model.{key}='{kw[key]}' is not one of {', '.join(allowed)}.")
      kw[key] = allowed[kw[key]]
  if kw.get("attention", "auto") not in ATTENTION:
    raise UserError(f"model.attention='{kw['attention']}' is not one of {', '.join(ATTENTION)}.")
  if kw.get("matmul", "auto") not in MATMUL:
    raise UserError(f"model.matmul='{kw['matmul']}' is not one of {', '.join(MATMUL)}.")
  return kw
