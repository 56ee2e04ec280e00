"""Pieces shared by tasks: config -> module kwargs, masked means."""

import jax.numpy as jnp

from vlm_jax import kernels
from vlm_jax.errors import UserError
from vlm_jax.models.precision import MM_DTYPES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def module_kwargs(model_cfg, module=None, exclude=()) -> dict:
  """A config's `model` ConfigDict (or a dict) as keyword arguments of the Flax module class
  `module` (dtype names resolved). With `module`, `attention` ("auto" unless set) becomes the
  module's `attention_fn`, chosen by `vlm_jax.kernels` for its dtypes and head dimension."""
  d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  kw = {k: v for k, v in d.items() if k not in exclude}
  for key in ("dtype", "param_dtype", "dtype_mm"):
    if key in kw:
      allowed = MM_DTYPES if key == "dtype_mm" else DTYPES
      if kw[key] not in allowed:
        raise UserError(f"model.{key}='{kw[key]}' is not one of {', '.join(allowed)}.")
      kw[key] = allowed[kw[key]]
  if module is not None:
    get = lambda key: kw.get(key, getattr(module, key))
    head_dim = get("width") // get("num_heads") if get("num_heads") else 0  # the module reports bad heads
    kw["attention_fn"] = kernels.attention_fn(kw.pop("attention", "auto"), dtype=get("dtype"),
                                              dtype_mm=get("dtype_mm"), head_dim=head_dim)
  return kw
