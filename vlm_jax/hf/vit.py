"""Mapping between `vlm_jax.models.vit.ViT` params and Hugging Face vision-transformer weights.

Two HF layouts carry our ViT exactly, chosen by how the model pools:
  "vit"     `ViTModel` / `ViTForImageClassification` (model_type "vit"): a class token whose
            position-embedding row comes first, classification from the class token of the final
            LayerNorm'd sequence. Ours with `pool="cls"`.
  "siglip"  `SiglipVisionModel` / `SiglipForImageClassification` (model_type
            "siglip_vision_model" / "siglip"): no class token; the classifier reads the mean of the
            final LayerNorm'd tokens (our `pool="gap"`); the optional MAP head (`vision_use_head`)
            is our `pool="map"`; no head is our `pool="none"` (all tokens, e.g. a captioner's encoder).
Keys are the on-disk (safetensors) names relative to the vision model; the caller adds the
container's prefix (`vit.`, `vision_model.`, `encoder.`).

Every numeric detail is mapped, not assumed: LayerNorm epsilon (`layer_norm_eps` = `ln_eps`),
GELU (`hidden_act` "gelu" exact / "gelu_pytorch_tanh" for `gelu_approximate`), q/k/v biases
(ours always have them: `qkv_bias=True`), attention scale 1/sqrt(head_dim) (both), heads
head-major (our [D, H, hd] kernels flatten to Linear's out axis), conv patch embedding
([p, p, C, D] HWIO -> [D, C, p, p]), position embeddings [1, N(+1), D] (HF ViT) or [N, D] (SigLIP).
HF `ViTModel`'s pooler (dense + tanh) has no counterpart in ours: the exporter writes an identity
dense with `pooler_act="linear"`, so `pooler_output` is exactly our pooled class token.
"""

import sys
from typing import Mapping

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.hf import files
from vlm_jax.hf.tree import f32, stacked, unstacked_blocks

LAYOUTS = ("vit", "siglip")
_ACT = {False: "gelu", True: "gelu_pytorch_tanh"}
_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh")


def layout_for_pool(pool: str, classifier: bool) -> str:
  """The HF layout that computes exactly what our ViT with `pool` does; ValueError if none does."""
  if pool == "cls":
    return "vit"
  if pool == "gap" or (pool in ("map", "none") and not classifier):
    return "siglip"
  raise ValueError(f"model.pool='{pool}' with a classification head has no Hugging Face equivalent "
                   "(ViTForImageClassification reads the class token: pool='cls'; "
                   "SiglipForImageClassification averages the tokens: pool='gap')")


def hf_act(gelu_approximate: bool) -> str:
  return _ACT[bool(gelu_approximate)]


def is_tanh_gelu(act: str) -> bool:
  if act in _TANH:
    return True
  if act == "gelu":
    return False
  raise ValueError(f"hidden_act='{act}' is neither exact GELU ('gelu') nor a tanh GELU ({', '.join(_TANH)})")


def vision_config(layout: str, *, width, depth, num_heads, mlp_dim, patch_size, image_size, ln_eps,
                  gelu_approximate, pool: str, **unused) -> dict:
  """Keyword arguments of `ViTConfig` ("vit") or `SiglipVisionConfig` ("siglip") for our ViT."""
  common = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=num_heads,
                intermediate_size=mlp_dim, patch_size=patch_size, image_size=image_size, num_channels=3,
                layer_norm_eps=float(ln_eps), hidden_act=hf_act(gelu_approximate))
  if layout == "vit":
    return dict(common, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                pooler_act="linear", pooler_output_size=width)
  return dict(common, vision_use_head=pool == "map", attention_dropout=0.0)


def model_kwargs_from_config(layout: str, cfg: Mapping) -> dict:
  """Our ViT keyword arguments (architecture and numerics) read off an HF vision config dict."""
  patch = cfg.get("patch_size", 16)
  image = cfg.get("image_size", 224)
  if isinstance(patch, (list, tuple)) or isinstance(image, (list, tuple)):
    if len(set(patch if isinstance(patch, (list, tuple)) else [patch])) > 1 or \
        len(set(image if isinstance(image, (list, tuple)) else [image])) > 1:
      raise ValueError(f"non-square patch_size={patch} / image_size={image} are not supported")
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    image = image[0] if isinstance(image, (list, tuple)) else image
  if layout == "vit" and not cfg.get("qkv_bias", True):
    raise ValueError("qkv_bias=False: our ViT always has query/key/value biases")
  if layout == "vit":
    pool, eps_default, act_default = "cls", 1e-12, "gelu"
  else:
    pool, eps_default, act_default = ("map" if cfg.get("vision_use_head", True) else "none"), 1e-6, "gelu_pytorch_tanh"
  return dict(width=cfg.get("hidden_size", 768), depth=cfg.get("num_hidden_layers", 12),
              num_heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
              patch_size=int(patch), image_size=int(image), pool=pool,
              ln_eps=float(cfg.get("layer_norm_eps", eps_default)),
              gelu_approximate=is_tanh_gelu(cfg.get("hidden_act", act_default)))


# -- ours -> HF ------------------------------------------------------------------------------------
def _linear_in(kernel):
  """A [D_in, ...] kernel (q/k/v [D, H, hd], fc [D, M]) -> Linear weight [out, in]."""
  k = f32(kernel)
  return f32(k.reshape(k.shape[0], -1).T)


def _out_linear(kernel):
  """Our attention output kernel [H, hd, D] -> Linear weight [D, H*hd]."""
  k = f32(kernel)
  return f32(k.reshape(-1, k.shape[-1]).T)


def _ln(sd, name, p):
  sd[f"{name}.weight"], sd[f"{name}.bias"] = f32(p["scale"]), f32(p["bias"])


def _attn_names(layout):
  if layout == "vit":
    return {"query": "attention.attention.query", "key": "attention.attention.key",
            "value": "attention.attention.value", "out": "attention.output.dense"}
  return {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
          "out": "self_attn.out_proj"}


def _block_names(layout):
  if layout == "vit":
    return "encoder.layer", "layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"
  return "encoder.layers", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"


def blocks_to_hf(encoder: Mapping, layout: str) -> dict:
  """Our pre-LN block stack (scanned or unrolled) -> {HF key: array} under `encoder.layer(s).i`
  (the "siglip" names are also CLIP's, vision and text)."""
  sd = {}
  stack, ln_a, ln_b, fc1, fc2 = _block_names(layout)
  attn_names = _attn_names(layout)
  for i, blk in enumerate(unstacked_blocks(encoder)):
    p = f"{stack}.{i}"
    _ln(sd, f"{p}.{ln_a}", blk["ln1"])
    _ln(sd, f"{p}.{ln_b}", blk["ln2"])
    a = blk["attn"]
    for ours in ("query", "key", "value"):
      sd[f"{p}.{attn_names[ours]}.weight"] = _linear_in(a[f"{ours}_kernel"])
      sd[f"{p}.{attn_names[ours]}.bias"] = f32(np.reshape(a[f"{ours}_bias"], -1))
    sd[f"{p}.{attn_names['out']}.weight"] = _out_linear(a["out_kernel"])
    sd[f"{p}.{attn_names['out']}.bias"] = f32(a["out_bias"])
    for theirs, ours in ((fc1, "fc1"), (fc2, "fc2")):
      sd[f"{p}.{theirs}.weight"] = _linear_in(blk["mlp"][ours]["kernel"])
      sd[f"{p}.{theirs}.bias"] = f32(blk["mlp"][ours]["bias"])
  return sd


def vit_to_hf(params: Mapping, layout: str) -> dict:
  """Our ViT params (scanned or unrolled, with or without `head`) -> {HF key: float32 array}.

  Keys are relative to the vision model (`embeddings...`, `encoder...`, `layernorm`/`post_layernorm`,
  `pooler`/`head`); `head` (our classifier) becomes `classifier.weight`/`.bias` at the top.
  """
  params = params.get("params", params)
  has_cls = "cls" in params
  if (layout == "vit") != has_cls:
    raise ValueError(f"layout '{layout}' needs {'a' if layout == 'vit' else 'no'} class token; params have "
                     f"{'one' if has_cls else 'none'}")
  sd = {}
  kernel = f32(params["embedding"]["kernel"])  # [p, p, C, D]
  conv = f32(kernel.transpose(3, 2, 0, 1))
  pos = f32(params["pos_embedding"])
  width = kernel.shape[-1]
  if layout == "vit":
    sd["embeddings.cls_token"] = f32(params["cls"])
    sd["embeddings.position_embeddings"] = pos
    sd["embeddings.patch_embeddings.projection.weight"] = conv
    sd["embeddings.patch_embeddings.projection.bias"] = f32(params["embedding"]["bias"])
  else:
    sd["embeddings.position_embedding.weight"] = f32(pos[0])
    sd["embeddings.patch_embedding.weight"] = conv
    sd["embeddings.patch_embedding.bias"] = f32(params["embedding"]["bias"])
  sd.update(blocks_to_hf(params["encoder"], layout))
  _ln(sd, "layernorm" if layout == "vit" else "post_layernorm", params["encoder"]["norm"])
  if layout == "vit" and "head" not in params:  # ViTModel's pooler: identity (pooler_act "linear")
    sd["pooler.dense.weight"] = np.eye(width, dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros((width,), np.float32)
  if "map_head" in params:
    if layout != "siglip":
      raise ValueError("a MAP head exports only to the SigLIP layout")
    h = params["map_head"]
    sd["head.probe"] = f32(params["map_head"]["probe"])
    q, k, v = (_linear_in(h["attn"][f"{n}_kernel"]) for n in ("query", "key", "value"))
    sd["head.attention.in_proj_weight"] = f32(np.concatenate([q, k, v], axis=0))
    sd["head.attention.in_proj_bias"] = f32(np.concatenate([np.reshape(h["attn"][f"{n}_bias"], -1)
                                                            for n in ("query", "key", "value")]))
    sd["head.attention.out_proj.weight"] = _out_linear(h["attn"]["out_kernel"])
    sd["head.attention.out_proj.bias"] = f32(h["attn"]["out_bias"])
    _ln(sd, "head.layernorm", h["ln"])
    for n in ("fc1", "fc2"):
      sd[f"head.mlp.{n}.weight"] = _linear_in(h["mlp"][n]["kernel"])
      sd[f"head.mlp.{n}.bias"] = f32(h["mlp"][n]["bias"])
  if "head" in params:
    sd["classifier.weight"] = f32(f32(params["head"]["kernel"]).T)
    sd["classifier.bias"] = f32(params["head"]["bias"])
  return sd


# -- HF -> ours ------------------------------------------------------------------------------------
def _get(sd, key):
  if key not in sd:
    raise KeyError(key)
  return f32(sd[key])


def _ln_from(sd, name):
  return {"scale": _get(sd, f"{name}.weight"), "bias": _get(sd, f"{name}.bias")}


def _heads_in(w, num_heads):
  """Linear weight [H*hd, D] -> our [D, H, hd]."""
  return f32(w.T.reshape(w.shape[1], num_heads, -1))


def _heads_out(w, num_heads):
  """Linear weight [D, H*hd] -> our [H, hd, D]."""
  return f32(w.T.reshape(num_heads, -1, w.shape[0]))


def _attn_from(get, names, num_heads):
  out = {}
  for ours in ("query", "key", "value"):
    out[f"{ours}_kernel"] = _heads_in(get(f"{names[ours]}.weight"), num_heads)
    out[f"{ours}_bias"] = f32(get(f"{names[ours]}.bias").reshape(num_heads, -1))
  out["out_kernel"] = _heads_out(get(f"{names['out']}.weight"), num_heads)
  out["out_bias"] = get(f"{names['out']}.bias")
  return out


def blocks_from_hf(sd: Mapping, layout: str, depth: int, num_heads: int, scan_layers: bool) -> dict:
  """{HF key: array} with `encoder.layer(s).i` blocks -> our block stack (no final norm)."""
  g = lambda k: _get(sd, k)
  stack, ln_a, ln_b, fc1, fc2 = _block_names(layout)
  names = _attn_names(layout)
  blocks = []
  for i in range(depth):
    p = f"{stack}.{i}"
    gi = lambda k, p=p: g(f"{p}.{k}")
    blocks.append({
        "ln1": _ln_from(sd, f"{p}.{ln_a}"), "ln2": _ln_from(sd, f"{p}.{ln_b}"),
        "attn": _attn_from(gi, names, num_heads),
        "mlp": {"fc1": {"kernel": f32(gi(f"{fc1}.weight").T), "bias": gi(f"{fc1}.bias")},
                "fc2": {"kernel": f32(gi(f"{fc2}.weight").T), "bias": gi(f"{fc2}.bias")}}})
  if f"{stack}.{depth}.{ln_a}.weight" in sd:
    raise ValueError(f"the weights have more than {depth} layers")
  return stacked(blocks, scan_layers)


def vit_from_hf(sd: Mapping, layout: str, depth: int, num_heads: int, *, scan_layers: bool = True) -> dict:
  """{HF key (relative to the vision model): array} -> our ViT params (numpy).

  `classifier.*`, when present, becomes our `head`; a SigLIP `head.*` (MAP) becomes `map_head`;
  ViTModel's pooler is dropped (ours has none). Raises KeyError naming a missing weight.
  """
  g = lambda k: _get(sd, k)
  params = {}
  if layout == "vit":
    params["cls"] = g("embeddings.cls_token")
    params["pos_embedding"] = g("embeddings.position_embeddings")
    conv, bias = g("embeddings.patch_embeddings.projection.weight"), g("embeddings.patch_embeddings.projection.bias")
  else:
    params["pos_embedding"] = g("embeddings.position_embedding.weight")[None]
    conv, bias = g("embeddings.patch_embedding.weight"), g("embeddings.patch_embedding.bias")
  params["embedding"] = {"kernel": f32(conv.transpose(2, 3, 1, 0)), "bias": bias}
  enc = blocks_from_hf(sd, layout, depth, num_heads, scan_layers)
  enc["norm"] = _ln_from(sd, "layernorm" if layout == "vit" else "post_layernorm")
  params["encoder"] = enc
  if layout == "siglip" and "head.probe" in sd:
    w, b = g("head.attention.in_proj_weight"), g("head.attention.in_proj_bias")
    d = w.shape[1]
    attn = {}
    for j, n in enumerate(("query", "key", "value")):
      attn[f"{n}_kernel"] = _heads_in(w[j * d:(j + 1) * d], num_heads)
      attn[f"{n}_bias"] = f32(b[j * d:(j + 1) * d].reshape(num_heads, -1))
    attn["out_kernel"] = _heads_out(g("head.attention.out_proj.weight"), num_heads)
    attn["out_bias"] = g("head.attention.out_proj.bias")
    params["map_head"] = {"probe": g("head.probe"), "attn": attn, "ln": _ln_from(sd, "head.layernorm"),
                          "mlp": {n: {"kernel": f32(g(f"head.mlp.{n}.weight").T), "bias": g(f"head.mlp.{n}.bias")}
                                  for n in ("fc1", "fc2")}}
  if "classifier.weight" in sd:
    params["head"] = {"kernel": f32(g("classifier.weight").T), "bias": g("classifier.bias")}
  return params


# -- the ViT family's export (classification runs) ------------------------------------------------
def hf_class(layout: str, classifier: bool) -> str:
  if layout == "vit":
    return "ViTForImageClassification" if classifier else "ViTModel"
  return "SiglipForImageClassification" if classifier else "SiglipVisionModel"


def export(run, out: str) -> str:
  """Writes config.json and model.safetensors for a ViT classifier (or, with `run.encoder_only`,
  its encoder without the head); returns the HF class name."""
  from transformers import SiglipConfig, SiglipVisionConfig, ViTConfig  # heavy to import; only an export needs it
  m = run.task.model
  params = dict(run.params)
  classifier = bool(m.num_classes) and not run.encoder_only
  if not classifier:
    params.pop("head", None)
  try:
    layout = layout_for_pool(m.pool, classifier)
  except ValueError as e:
    raise UserError(f"cannot export this run: {e}. Export the encoder alone with --encoder_only.") from None
  kw = {f: getattr(m, f) for f in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "ln_eps",
                                   "gelu_approximate", "pool")}
  vcfg = vision_config(layout, image_size=run.cfg.input.image_size, **kw)
  labels = {}
  if classifier:
    names = run.class_names or [str(i) for i in range(m.num_classes)]
    labels = dict(id2label={i: str(n) for i, n in enumerate(names)},
                  label2id={str(n): i for i, n in enumerate(names)})
  name = hf_class(layout, classifier)
  if layout == "vit":
    config = ViTConfig(**vcfg, **labels)
    prefix = "vit." if classifier else ""
  elif classifier:
    config = SiglipConfig(vision_config=vcfg, **labels)
    prefix = "vision_model."
  else:
    config = SiglipVisionConfig(**vcfg)
    prefix = ""
  config.architectures = [name]
  config.save_pretrained(out)
  sd = {(k if k.startswith("classifier.") else prefix + k): v for k, v in vit_to_hf(params, layout).items()}
  files.save_weights(out, sd)
  return name


# -- an HF vision model's folder -> ours (init_from='hf:PATH') ------------------------------------
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
    hf = model_kwargs_from_config(layout, vcfg)
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
    params = vit_from_hf(sd, layout, ours["depth"], ours["num_heads"], scan_layers="layers" in target["encoder"])
  except KeyError as e:
    raise UserError(f"{where} lacks the weight {e}; it is not a complete {model_type} model.") from None
  if "cls" in params and "cls" not in target:  # a class token this model does not use: drop its row
    params.pop("cls")
    params["pos_embedding"] = params["pos_embedding"][:, 1:]
  print(f"{where}: layer_norm_eps={hf['ln_eps']}, {'tanh' if hf['gelu_approximate'] else 'exact'} GELU "
        f"(outputs match ours with model.ln_eps={hf['ln_eps']}, model.gelu_approximate={hf['gelu_approximate']})",
        file=sys.stderr, flush=True)
  return params
