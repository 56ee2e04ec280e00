"""Import: a local Hugging Face model folder -> our params, for `config.init_from = "hf:PATH"`.

The mapping tables of the family modules run backwards. Which family reads the folder is decided
here, by the folder's `model_type`:
  vit                      ViTModel / ViTForImageClassification (DINO, ViT, DeiT-style weights)
  siglip_vision_model      SiglipVisionModel
  siglip                   SiglipForImageClassification (the vision tower of a SigLIP config)
  vision-encoder-decoder   our exported captioner (ViT or SigLIP encoder, GPT-2 decoder)
  siglip / clip            SiglipModel / CLIPModel into a two-tower model (`vlm_jax.hf.twotower`)
The result has our parameter names and is shaped by the target (scanned or unrolled layers, class
token or not); `init.load_params` then copies it by `init_include`, resizing position
embeddings to the target resolution. Sizes that decide the architecture (width, depth, heads, MLP,
patch size, vocabulary) must match, or one error names the first difference.
"""

from vlm_jax.errors import UserError
from vlm_jax.hf import captioner, files, twotower, vit

VISION_TYPES = ("vit", "siglip_vision_model", "siglip")


def params_from_hf(path: str, target: dict) -> dict:
  """Our params (nested numpy dict, a subset of `target`'s structure) read from the HF folder `path`."""
  config, sd = files.read_model_folder(path)
  model_type = config.get("model_type")
  where = f"init_from='hf:{path}'"
  if model_type == "vision-encoder-decoder":
    if "img" not in target:
      return vit.vision_from_hf(config.get("encoder", {}),
                                {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")},
                                target, where)
    return captioner.from_hf(config, sd, target, where)
  if model_type in ("siglip", "clip") and "logit_scale" in target:
    return twotower.from_hf(config, sd, target, where)
  if model_type in VISION_TYPES:
    if "img" in target:
      return {"img": vit.vision_from_hf(config, sd, target["img"], where)}
    return vit.vision_from_hf(config, sd, target, where)
  raise UserError(f"{where}: model_type '{model_type}' cannot initialise this model; supported: "
                  f"{', '.join(VISION_TYPES + ('vision-encoder-decoder', 'clip'))}.")
