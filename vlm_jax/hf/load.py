"""Import: a local Hugging Face model folder -> our params, for `config.init_from = "hf:PATH"`.

The mapping tables of the family modules run backwards. Which family reads the folder is decided
here, by the folder's `model_type`:
  vit                      ViTModel / ViTForImageClassification (DINO, ViT, DeiT-style weights)
  siglip_vision_model      SiglipVisionModel
  siglip                   SiglipForImageClassification (the vision tower of a SigLIP config)
  vision-encoder-decoder   our exported captioner (ViT or SigLIP encoder, GPT-2 decoder)
  siglip / clip            SiglipModel / CLIPModel into a two-tower model (`vlm_jax.hf.twotower`)
The result has our parameter names and is shaped by the target (scanned or unrolled layers, class
token or not); `checkpoint.load_params` then copies it by `init_include`, resizing position
embeddings to the target resolution. Sizes that decide the architecture (width, depth, heads, MLP,
patch size, vocabulary) must match, or one error names the first difference.
"""

import sys

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.hf import captioner, files, twotower, vit
from vlm_jax.hf.tree import unstacked_blocks

VISION_TYPES = ("vit", "siglip_vision_model", "siglip")


def params_from_hf(path: str, target: dict) -> dict:
  """Our params (nested numpy dict, a subset of `target`'s structure) read from the HF folder `path`."""
  config, sd = files.read_model_folder(path)
  model_type = config.get("model_type")
  where = f"init_from='hf:{path}'"
  if model_type == "vision-encoder-decoder":
    if "img" not in target:
      return vision_from_hf(config.get("encoder", {}),
                            {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")},
                            target, where)
    return captioner.from_hf(config, sd, target, where)
  if model_type in ("siglip", "clip") and "logit_scale" in target:
    return twotower.from_hf(config, sd, target, where)
  if model_type in VISION_TYPES:
    if "img" in target:
      return {"img": vision_from_hf(config, sd, target["img"], where)}
    return vision_from_hf(config, sd, target, where)
  raise UserError(f"{where}: model_type '{model_type}' cannot initialise this model; supported: "
                  f"{', '.join(VISION_TYPES + ('vision-encoder-decoder', 'clip'))}.")


def _strip(sd: dict, prefix: str) -> dict:
  return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def check_sizes(where: str, theirs: dict, ours: dict) -> None:
  for key, value in ours.items():
    if theirs.get(key) is not None and int(theirs[key]) != int(value):
      raise UserError(f"{where} is a different size: its {key} is {theirs[key]}, this config builds {value}. "
                      f"Make the model config match the Hugging Face model or choose another folder.")


def vision_from_hf(config: dict, sd: dict, target: dict, where: str) -> dict:
  """HF ViT / SigLIP vision weights -> our ViT params shaped like `target` (a ViT params tree)."""
  model_type = config.get("model_type")
  if model_type == "vit":
    layout, vcfg, sd = "vit", config, _strip(sd, "vit.")
  elif model_type == "siglip_vision_model":
    layout, vcfg, sd = "siglip", config, _strip(sd, "vision_model.")
  elif model_type == "siglip":
    layout, vcfg, sd = "siglip", config.get("vision_config", {}), _strip(sd, "vision_model.")
  else:
    raise UserError(f"{where}: its vision model is '{model_type}'; only ViT and SigLIP vision models map onto "
                    f"our ViT.")
  if "embedding" not in target or "encoder" not in target:
    raise UserError(f"{where} holds a vision model, but this config's model is not a ViT.")
  try:
    hf = vit.model_kwargs_from_config(layout, vcfg)
  except ValueError as e:
    raise UserError(f"{where}: {e}.") from None
  blocks = unstacked_blocks(target["encoder"])
  kernel = np.shape(target["embedding"]["kernel"])
  ours = {"width": kernel[-1], "depth": len(blocks), "num_heads": np.shape(blocks[0]["attn"]["query_bias"])[0],
          "mlp_dim": np.shape(blocks[0]["mlp"]["fc1"]["kernel"])[-1], "patch_size": kernel[0]}
  check_sizes(where, hf, ours)
  if "cls" in target and layout != "vit":
    raise UserError(f"{where} has no class token (a SigLIP vision model) but this config uses model.pool='cls'. "
                    f"Use model.pool='gap', 'map' or 'none'.")
  try:
    params = vit.vit_from_hf(sd, layout, ours["depth"], ours["num_heads"], scan_layers="layers" in target["encoder"])
  except KeyError as e:
    raise UserError(f"{where} lacks the weight {e}; it is not a complete {model_type} model.") from None
  if "cls" in params and "cls" not in target:  # a class token this model does not use: drop its row
    params.pop("cls")
    params["pos_embedding"] = params["pos_embedding"][:, 1:]
  print(f"{where}: layer_norm_eps={hf['ln_eps']}, {'tanh' if hf['gelu_approximate'] else 'exact'} GELU "
        f"(outputs match ours with model.ln_eps={hf['ln_eps']}, model.gelu_approximate={hf['gelu_approximate']})",
        file=sys.stderr, flush=True)
  return params
