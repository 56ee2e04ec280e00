"""Captioner / VQA model <-> Hugging Face `VisionEncoderDecoderModel` (the captioner family).

Encoder: our ViT with `pool="none"` (all patch tokens) -> `SiglipVisionModel` without head, or
`pool="cls"` -> `ViTModel` (see `vlm_jax.hf.vit`). Decoder: our pre-LN cross-attention Decoder ->
`GPT2LMHeadModel(add_cross_attention=True)` (see `vlm_jax.hf.gpt2`); when the encoder is wider or
narrower than the decoder, our `enc_proj` is VisionEncoderDecoderModel's `enc_to_dec_proj`.
On disk: `encoder.*` (vision model keys), `decoder.*` (GPT-2 keys), `enc_to_dec_proj.*`.

Generation: `generation_config.json` holds greedy decoding with decoder_start_token_id = BOS,
eos/pad ids and `max_new_tokens` = the run's decode length, which is what `vlm_jax.decode.greedy`
does (an example stops at EOS or after that many tokens). VQA: the prompt `[BOS] question [SEP]`
is passed as `decoder_input_ids` (see the README).
"""

import dataclasses

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.hf import files, gpt2, vit
from vlm_jax.hf.tree import unstacked_blocks
from vlm_jax.models.text import Decoder
from vlm_jax.models.vit import ViT

HF_CLASS = "VisionEncoderDecoderModel"


def encoder_layout(pool: str) -> str:
  if pool == "none":
    return "siglip"
  if pool == "cls":
    return "vit"
  raise UserError(f"model.encoder.pool='{pool}' cannot be exported: a VisionEncoderDecoderModel encoder "
                  "passes all tokens to the decoder ('none' -> SigLIP vision model, 'cls' -> ViT).")


def gpt2_config(dec: dict, vocab_size: int, ids: dict) -> dict:
  """GPT2Config keyword arguments for our Decoder keyword arguments `dec`."""
  return dict(add_cross_attention=True, is_decoder=True, vocab_size=vocab_size, n_embd=dec["width"],
              n_layer=dec["depth"], n_head=dec["num_heads"], n_inner=dec["mlp_dim"], n_positions=dec["max_len"],
              layer_norm_epsilon=float(dec["ln_eps"]),
              activation_function="gelu_new" if dec["gelu_approximate"] else "gelu",
              tie_word_embeddings=bool(dec["tie_embeddings"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
              bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
              decoder_start_token_id=ids["bos"])


def state_dict(params) -> dict:
  """Captioner params {"img", "txt"} -> {VisionEncoderDecoderModel on-disk key: array}."""
  enc = params["img"]
  layout = "vit" if "cls" in enc else "siglip"
  sd = {f"encoder.{k}": v for k, v in vit.vit_to_hf(enc, layout).items()}
  for k, v in gpt2.decoder_to_gpt2_state_dict(params["txt"]).items():
    sd[k if k.startswith("enc_to_dec_proj.") else f"decoder.{k}"] = v
  return sd


def export(run, out: str) -> str:
  """Writes config.json, generation_config.json and model.safetensors for a captioning run."""
  # transformers is heavy to import; only an export needs it
  from transformers import GenerationConfig, GPT2Config, SiglipVisionConfig, ViTConfig, VisionEncoderDecoderConfig
  task = run.task
  enc_kw, dec_kw = dict(task.model.encoder), dict(task.model.decoder)
  enc_kw = {**_defaults(ViT), **enc_kw, "pool": enc_kw.get("pool", "none")}
  dec_kw = {**_defaults(Decoder), **dec_kw}
  layout = encoder_layout(enc_kw["pool"])
  tok = task.tokenizer
  ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
  vcfg = vit.vision_config(layout, image_size=run.cfg.input.image_size, **enc_kw)
  enc_cfg = ViTConfig(**vcfg) if layout == "vit" else SiglipVisionConfig(**vcfg)
  dec_cfg = GPT2Config(**gpt2_config(dec_kw, dec_kw["vocab_size"], ids))
  config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc_cfg, dec_cfg)
  config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = ids["bos"], ids["pad"], ids["eos"]
  config.architectures = [HF_CLASS]
  config.save_pretrained(out)
  GenerationConfig(decoder_start_token_id=ids["bos"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                   pad_token_id=ids["pad"], max_new_tokens=int(task.decode_len), do_sample=False,
                   num_beams=1).save_pretrained(out)
  files.save_weights(out, state_dict(run.params))
  return HF_CLASS


def _defaults(module_cls) -> dict:
  """Field defaults of a linen module dataclass (what a config that omits a key gets)."""
  return {f.name: f.default for f in dataclasses.fields(module_cls)
          if f.default is not dataclasses.MISSING and f.name not in ("parent", "name")}


def from_hf(config: dict, sd: dict, target: dict, where: str) -> dict:
  """VisionEncoderDecoderModel (ViT or SigLIP encoder, GPT-2 decoder) weights -> {"img", "txt"} params
  shaped like `target` (a Captioner's params)."""
  dec_cfg = config.get("decoder", {})
  if dec_cfg.get("model_type") != "gpt2":
    raise UserError(f"{where}: the decoder is '{dec_cfg.get('model_type')}'; only a GPT-2 decoder "
                    "(add_cross_attention=True) maps onto our Decoder.")
  enc_sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
  out = {"img": vit.vision_from_hf(config.get("encoder", {}), enc_sd, target["img"], where)}
  if "txt" not in target:
    return out
  t = target["txt"]
  blocks = unstacked_blocks(t)
  heads = int(np.shape(blocks[0]["self_attn"]["query_bias"])[0])
  vocab, width = np.shape(t["token_embed"]["embedding"])
  vit.check_sizes(where, {"width": dec_cfg.get("n_embd"), "depth": dec_cfg.get("n_layer"),
                           "num_heads": dec_cfg.get("n_head"), "vocab_size": dec_cfg.get("vocab_size")},
                   {"width": width, "depth": len(blocks), "num_heads": heads, "vocab_size": vocab})
  try:
    out["txt"] = gpt2.decoder_from_gpt2_state_dict(
        {k: v for k, v in sd.items() if k.startswith(("decoder.", "enc_to_dec_proj."))}, len(blocks), heads,
        scan_layers="layers" in t, tie_embeddings="head" not in t)
  except (KeyError, ValueError) as e:
    raise UserError(f"{where}: its decoder does not fit ours ({e}).") from None
  return out
