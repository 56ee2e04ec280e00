"""Two-tower contrastive model (`TwoTower`) <-> Hugging Face `SiglipModel` / `CLIPModel`.

Which class is decided by the model's layout (`layout`), never guessed:
  "siglip"  image pool "map" without class token or pre-norm, no image projection (the MAP head's
            output is the embedding); bidirectional text tower pooled at the last position
            (`pool="last_position"`), `txt_proj` with bias = HF's text `head`; logit scale and bias.
  "clip"    image pool "cls" with `pre_norm` (HF `pre_layrnorm`); causal text tower pooled at EOS
            (`pool="last"`); both projections without bias; logit scale, no bias.
Anything else (a BERT text tower, mean pooling, ...) is refused with one error naming the option.

Two CLIP details are mapped, not assumed:
- HF CLIP's patch convolution has no bias. Ours adds it to every patch token before the position
  embedding, so it is folded into the patch rows of HF's position embedding (the class-token row
  gets none). Import gives a zero bias and those summed rows: the same outputs (a float32 sum),
  and re-exporting the import is bitwise equal to the folder.
- `CLIPTextModel` pools with the legacy argmax over ids when `eos_token_id == 2`, which our EOS id
  is. The exporter swaps EOS with the last id of the vocabulary, in the token embedding, the
  tokenizer and the config alike (`vlm_jax_token_swap` in config.json records it), so HF pools at
  the first EOS, which is ours; import swaps the rows back.
And one SigLIP detail: our text tower is trained on inputs padded to `input.max_len` = L, masks
padding keys and pools at position L - 1; the zero-shot pipeline pads SigLIP inputs to 64 tokens
(with the attention mask, which HF applies as we do) and HF pools at position 63. When the text
tower has fewer than 64 positions, the export has 64 (`PIPELINE_LEN`): ours first, row 63 a copy
of our row L - 1, zeros between (read only by masked padding queries). Inputs padded to L or to
64 then give our embedding, for texts of up to L - 1 tokens with BOS and EOS (ours pools a pad
position for those, which the recipes' max_len ensures). Import keeps the first rows.
"""

import json

import numpy as np
import tokenizers

from vlm_jax.errors import UserError
from vlm_jax.hf import files, vit
from vlm_jax.hf.captioner import _defaults
from vlm_jax.hf.tokenizer import hf_fast_tokenizer
from vlm_jax.hf.tree import f32, unstacked_blocks
from vlm_jax.models.text import TextEncoder
from vlm_jax.models.vit import ViT

HF_CLASS = {"siglip": "SiglipModel", "clip": "CLIPModel"}
SWAP_KEY = "vlm_jax_token_swap"
PIPELINE_LEN = 64  # transformers' zero-shot pipeline pads SigLIP text to this length
writes_tokenizer = True  # export.write leaves the tokenizer to this module


def layout(model) -> str:
  """"siglip" or "clip" for a TwoTower module; UserError naming the first option that fits neither."""
  img, txt = dict(model.image or {}), dict(model.text or {})
  if txt.get("layout", "pre_ln") != "pre_ln":
    raise UserError("a two-tower model with model.text.layout='bert' (LiT with a BERT text tower) has no "
                    "SiglipModel/CLIPModel equivalent; only pre-LN text towers export.")
  siglip = dict(image_pool=(img.get("pool", "cls"), "map"), pre_norm=(bool(img.get("pre_norm")), False),
                image_proj=(model.image_proj, False), text_causal=(bool(txt.get("causal")), False),
                text_pool=(txt.get("pool", "last"), "last_position"), text_proj=(model.text_proj, True),
                proj_bias=(model.proj_bias, True), logit_bias=(model.logit_bias_init is not None, True))
  clip = dict(image_pool=(img.get("pool", "cls"), "cls"), pre_norm=(bool(img.get("pre_norm")), True),
              image_proj=(model.image_proj, True), text_causal=(bool(txt.get("causal")), True),
              text_pool=(txt.get("pool", "last"), "last"), text_proj=(model.text_proj, True),
              proj_bias=(model.proj_bias, False), logit_bias=(model.logit_bias_init is not None, False))
  for name, want in (("siglip", siglip), ("clip", clip)):
    if all(a == b for a, b in want.values()):
      return name
  target = "clip" if img.get("pool", "cls") == "cls" else "siglip"
  bad = next(k for k, (a, b) in (clip if target == "clip" else siglip).items() if a != b)
  have, want = (clip if target == "clip" else siglip)[bad]
  raise UserError(f"this two-tower model cannot be exported: {bad} is {have!r}, but {HF_CLASS[target]} needs "
                  f"{want!r} (see configs/siglip_shapes.py and configs/clip_shapes.py for exportable layouts).")


# -- ours -> HF ------------------------------------------------------------------------------------
def _text_to_hf(txt: dict, swap=None) -> dict:
  emb = f32(txt["token_embed"]["embedding"])
  if swap:
    a, b = swap
    emb = emb.copy()
    emb[[a, b]] = emb[[b, a]]
  sd = {"embeddings.token_embedding.weight": emb, "embeddings.position_embedding.weight": f32(txt["pos_embedding"]),
        "final_layer_norm.weight": f32(txt["norm"]["scale"]), "final_layer_norm.bias": f32(txt["norm"]["bias"])}
  sd.update(vit.blocks_to_hf(txt, "siglip"))
  return sd


def _clip_vision_to_hf(img: dict) -> dict:
  pos = f32(img["pos_embedding"])[0]  # [1 + N, D]: class-token row first
  bias = f32(img["embedding"]["bias"])
  sd = {k: v for k, v in vit.vit_to_hf({**{k: v for k, v in img.items() if k not in ("cls", "pre_norm")},
                                        "pos_embedding": pos[None, 1:]}, "siglip").items()
        if not k.startswith("embeddings.")}
  sd["embeddings.class_embedding"] = f32(np.reshape(img["cls"], -1))
  sd["embeddings.patch_embedding.weight"] = f32(f32(img["embedding"]["kernel"]).transpose(3, 2, 0, 1))
  sd["embeddings.position_embedding.weight"] = f32(np.concatenate([pos[:1], pos[1:] + bias[None]]))
  sd["pre_layrnorm.weight"], sd["pre_layrnorm.bias"] = f32(img["pre_norm"]["scale"]), f32(img["pre_norm"]["bias"])
  return sd


def siglip_positions(pos, pool_len: int) -> np.ndarray:
  """Our text position embedding [M, D] -> HF's [64, D] (see the module docstring) when M < 64."""
  pos = f32(pos)
  if len(pos) >= PIPELINE_LEN or pool_len == PIPELINE_LEN:
    return pos
  out = np.zeros((PIPELINE_LEN, pos.shape[1]), np.float32)
  out[:len(pos)] = pos
  out[-1] = pos[pool_len - 1]
  return out


def state_dict(params: dict, kind: str, swap=None, pool_len=None) -> dict:
  """TwoTower params -> {SiglipModel / CLIPModel on-disk key: array}; `pool_len`: the length SigLIP text
  was padded to in training (input.max_len)."""
  sd = {f"text_model.{k}": v for k, v in _text_to_hf(params["txt"], swap).items()}
  if kind == "siglip":
    key = "text_model.embeddings.position_embedding.weight"
    sd[key] = siglip_positions(sd[key], pool_len)
    sd.update({f"vision_model.{k}": v for k, v in vit.vit_to_hf(params["img"], "siglip").items()})
    sd["text_model.head.weight"] = f32(f32(params["txt_proj"]["kernel"]).T)
    sd["text_model.head.bias"] = f32(params["txt_proj"]["bias"])
    sd["logit_scale"] = f32(np.reshape(params["logit_scale"], (1,)))
    sd["logit_bias"] = f32(np.reshape(params["logit_bias"], (1,)))
  else:
    sd.update({f"vision_model.{k}": v for k, v in _clip_vision_to_hf(params["img"]).items()})
    sd["visual_projection.weight"] = f32(f32(params["img_proj"]["kernel"]).T)
    sd["text_projection.weight"] = f32(f32(params["txt_proj"]["kernel"]).T)
    sd["logit_scale"] = np.asarray(params["logit_scale"], np.float32).reshape(())
  return sd


def _swap_ids(state: dict, a: int, b: int) -> dict:
  """A tokenizers JSON state with ids `a` and `b` exchanged (vocabulary, added tokens, template)."""
  swap = lambda i: b if i == a else a if i == b else i
  vocab = state["model"].get("vocab")
  if not isinstance(vocab, dict):
    raise UserError("the CLIP export remaps the EOS id, which needs a tokenizer with a token->id vocabulary "
                    "(WordLevel, WordPiece or BPE).")
  state["model"]["vocab"] = {t: swap(i) for t, i in vocab.items()}
  for t in state.get("added_tokens", []):
    t["id"] = swap(t["id"])
  for spec in (state.get("post_processor") or {}).get("special_tokens", {}).values():
    spec["ids"] = [swap(i) for i in spec["ids"]]
  return state


def hf_tokenizer(tok, swap=None, max_len=None):
  """The HF fast tokenizer of `tok`, with the ids of `swap` exchanged and `model_max_length` = max_len."""
  from transformers import PreTrainedTokenizerFast  # heavy to import; only an export needs it
  fast = hf_fast_tokenizer(tok)
  backend = fast.backend_tokenizer
  if swap:
    backend = tokenizers.Tokenizer.from_str(json.dumps(_swap_ids(json.loads(backend.to_str()), *swap)))
  extra = {"model_max_length": max_len} if max_len else {}
  return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="right", clean_up_tokenization_spaces=False,
                                 **{k: getattr(fast, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                                                  "mask_token", "sep_token")}, **extra)


def _text_config(txt: dict, vocab: int, ids: dict, act: str) -> dict:
  return dict(vocab_size=vocab, hidden_size=txt["width"], intermediate_size=txt["mlp_dim"],
              num_hidden_layers=txt["depth"], num_attention_heads=txt["num_heads"],
              max_position_embeddings=txt["max_len"], layer_norm_eps=float(txt["ln_eps"]), hidden_act=act,
              attention_dropout=0.0, pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])


def export(run, out: str) -> str:
  """Writes config.json, model.safetensors and the tokenizer (CLIP: with the EOS id remapped)."""
  from transformers import CLIPConfig, SiglipConfig  # heavy to import; only an export needs it
  m, tok = run.task.model, run.task.tokenizer
  kind = layout(m)
  img = {**_defaults(ViT), **dict(m.image)}
  txt = {**_defaults(TextEncoder), **dict(m.text)}
  vocab = int(np.shape(run.params["txt"]["token_embed"]["embedding"])[0])
  ids = {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id}
  swap = None
  if kind == "clip" and tok.eos_id == 2:  # CLIPTextModel's legacy argmax pooling: move EOS elsewhere
    swap = (2, vocab - 1)
    ids = {k: vocab - 1 if i == 2 else 2 if i == vocab - 1 else i for k, i in ids.items()}
  vcfg = vit.vision_config("siglip", image_size=run.cfg.input.image_size, **img)
  pool_len = int(run.cfg.input.max_len)
  if kind == "siglip":
    tcfg = _text_config(txt, vocab, ids, vit.hf_act(txt["gelu_approximate"]))
    tcfg["max_position_embeddings"] = len(siglip_positions(run.params["txt"]["pos_embedding"], pool_len))
    tcfg["projection_size"] = int(np.shape(run.params["txt_proj"]["kernel"])[1])
    config = SiglipConfig(text_config=tcfg, vision_config=vcfg)
  else:
    clip_act = lambda approximate: "gelu_new" if approximate else "gelu"
    tcfg = _text_config(txt, vocab, ids, clip_act(txt["gelu_approximate"]))
    vcfg = {k: v for k, v in vcfg.items() if k != "vision_use_head"}
    vcfg["hidden_act"] = clip_act(img["gelu_approximate"])
    config = CLIPConfig(text_config=tcfg, vision_config=vcfg,
                        projection_dim=int(np.shape(run.params["img_proj"]["kernel"])[1]),
                        logit_scale_init_value=float(np.asarray(run.params["logit_scale"])))
    if swap:
      setattr(config, SWAP_KEY, list(swap))
  config.architectures = [HF_CLASS[kind]]
  config.save_pretrained(out)
  files.save_weights(out, state_dict(run.params, kind, swap, pool_len))
  # SigLIP pools at the last position: padding="max_length" alone pads to the trained length.
  hf_tokenizer(tok, swap, pool_len if kind == "siglip" else None).save_pretrained(out)
  return HF_CLASS[kind]


# -- HF -> ours ------------------------------------------------------------------------------------
def from_hf(config: dict, sd: dict, target: dict, where: str) -> dict:
  """SiglipModel / CLIPModel weights -> TwoTower params shaped like `target`."""
  kind = "clip" if config.get("model_type") == "clip" else "siglip"
  vcfg, tcfg = config.get("vision_config", {}), config.get("text_config", {})
  g = lambda k: _need(sd, k, where)
  t = target["txt"]
  blocks = unstacked_blocks(t)
  vocab, width = np.shape(t["token_embed"]["embedding"])
  heads = int(np.shape(blocks[0]["attn"]["query_bias"])[0])
  vit.check_sizes(where, {"width": tcfg.get("hidden_size"), "depth": tcfg.get("num_hidden_layers"),
                           "num_heads": tcfg.get("num_attention_heads"), "vocab_size": tcfg.get("vocab_size")},
                   {"width": width, "depth": len(blocks), "num_heads": heads, "vocab_size": vocab})
  text_sd = {k[len("text_model."):]: v for k, v in sd.items() if k.startswith("text_model.")}
  emb = g("text_model.embeddings.token_embedding.weight")
  swap = config.get(SWAP_KEY)
  if swap:
    emb = emb.copy()
    emb[list(swap)] = emb[list(swap)[::-1]]
  try:
    txt = vit.blocks_from_hf(text_sd, "siglip", len(blocks), heads, "layers" in t)
  except (KeyError, ValueError) as e:
    raise UserError(f"{where}: its text model does not fit ours ({e}).") from None
  txt["norm"] = {"scale": g("text_model.final_layer_norm.weight"), "bias": g("text_model.final_layer_norm.bias")}
  pos = g("text_model.embeddings.position_embedding.weight")
  if kind == "siglip":  # an export of ours has 64 rows (see the module docstring); ours are the first
    pos = pos[:np.shape(t["pos_embedding"])[0]]
  out = {"txt": {"token_embed": {"embedding": f32(emb)}, "pos_embedding": f32(pos), **txt}}
  vision_sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
  if kind == "siglip":
    out["img"] = vit.vision_from_hf(config, vision_sd, target["img"], where)
    out["txt_proj"] = {"kernel": f32(g("text_model.head.weight").T), "bias": g("text_model.head.bias")}
    out["logit_bias"] = np.asarray(g("logit_bias"), np.float32).reshape(())
  else:
    out["img"] = _clip_vision_from_hf(vcfg, vision_sd, target["img"], where)
    out["img_proj"] = {"kernel": f32(g("visual_projection.weight").T)}
    out["txt_proj"] = {"kernel": f32(g("text_projection.weight").T)}
  out["logit_scale"] = np.asarray(g("logit_scale"), np.float32).reshape(())  # f32 would make it 1-D
  return out


def _clip_vision_from_hf(vcfg: dict, sd: dict, target: dict, where: str) -> dict:
  if "cls" not in target or "pre_norm" not in target:
    raise UserError(f"{where} holds a CLIP vision tower (class token, pre-LayerNorm); this config needs "
                    f"model.image.pool='cls' and model.image.pre_norm=True.")
  patch = _need(sd, "embeddings.patch_embedding.weight", where)
  renamed = {**sd, "embeddings.patch_embedding.bias": np.zeros((patch.shape[0],), np.float32)}
  pos = _need(sd, "embeddings.position_embedding.weight", where)
  renamed["embeddings.position_embedding.weight"] = pos[1:]
  img = vit.vision_from_hf({**vcfg, "model_type": "siglip_vision_model", "vision_use_head": False}, renamed,
                            {k: v for k, v in target.items() if k not in ("cls", "pre_norm")}, where)
  img["cls"] = _need(sd, "embeddings.class_embedding", where).reshape(1, 1, -1)
  img["pos_embedding"] = f32(pos[None])
  img["pre_norm"] = {"scale": _need(sd, "pre_layrnorm.weight", where), "bias": _need(sd, "pre_layrnorm.bias", where)}
  return img


def _need(sd: dict, key: str, where: str):
  if key not in sd:
    raise UserError(f"{where} lacks the weight {key}; it is not a complete two-tower model.")
  return f32(sd[key])
