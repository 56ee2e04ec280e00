"""TwoTower <-> Hugging Face SiglipModel / CLIPModel on random tiny models: image and text embeddings and
logits_per_image equal (<= 1e-4), import round trip (SigLIP bitwise; CLIP: the patch bias is folded into
the position embedding, so the import re-exports bitwise), the zero-shot pipeline offline, refusals.
"""

import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tests run in the Python 3.11 CI lane (requirements-lowest.txt)")
transformers = pytest.importorskip("transformers")

from tests.hf.helpers import IMAGE, images, make_run, random_params, torch_images  # noqa: E402
from vlm_jax import init  # noqa: E402
from vlm_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from vlm_jax.errors import UserError  # noqa: E402
from vlm_jax.hf import export, twotower  # noqa: E402
from vlm_jax.models.vlm import TwoTower  # noqa: E402

MAX_LEN = 10
TEXTS = ["a red circle", "a blue square left of a green triangle", "two circles", "a photo of a square"]


def _model(kind, vocab):
  img = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=40, ln_eps=1e-6, gelu_approximate=True)
  txt = dict(vocab_size=vocab, width=48, depth=2, num_heads=2, mlp_dim=40, max_len=MAX_LEN, ln_eps=1e-5,
             gelu_approximate=True, pad_id=0)
  if kind == "siglip":
    return TwoTower(image=dict(img, pool="map", scan_layers=True), text=dict(txt, pool="last_position"),
                    image_proj=False, text_proj=True, proj_bias=True, logit_bias_init=-10.0)
  return TwoTower(image=dict(img, pool="cls", pre_norm=True, scan_layers=False),
                  text=dict(txt, causal=True, pool="last", scan_layers=False), embed_dim=24,
                  image_proj=True, text_proj=True, proj_bias=False, logit_bias_init=None)


@pytest.fixture(scope="module", params=["siglip", "clip"])
def exported(request, tmp_path_factory):
  tok = tokenizer_lib.train_tokenizer(TEXTS, vocab_size=40, kind="wordlevel")
  model = _model(request.param, tok.vocab_size)
  params = random_params(model, np.zeros((1, IMAGE, IMAGE, 3), np.float32), np.zeros((1, MAX_LEN), np.int32),
                         scale=0.3)
  run = make_run(model, params, task="contrastive", tokenizer=tok)
  run.cfg.input.max_len = MAX_LEN
  out = str(tmp_path_factory.mktemp(request.param) / "hf")
  name = export.write(run, out)
  assert name == twotower.HF_CLASS[request.param]
  cls = getattr(transformers, name)
  hf, info = cls.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return types.SimpleNamespace(kind=request.param, model=model, params=params, tok=tok, out=out, hf=hf.eval(),
                               run=run)


def test_embeddings_and_logits_match(exported):
  x = images()
  tokens = exported.tok.caption_sequences(TEXTS, MAX_LEN)[0]
  zimg, ztxt = exported.model.apply({"params": exported.params}, x, tokens)
  scale, bias = exported.model.apply({"params": exported.params}, method=TwoTower.temperature)
  logits = np.asarray(zimg) @ np.asarray(ztxt).T * np.exp(scale) + bias
  hf_tok = transformers.AutoTokenizer.from_pretrained(exported.out)
  enc = hf_tok(TEXTS, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
  if exported.kind == "clip":  # EOS was moved off id 2 (CLIP's legacy pooling) in tokenizer and embedding
    assert exported.hf.config.text_config.eos_token_id == exported.tok.vocab_size - 1
    assert (enc.input_ids == exported.hf.config.text_config.eos_token_id).sum(1).tolist() == [1] * len(TEXTS)
  else:  # padding="max_length" alone pads to the trained length, where SigLIP text is pooled
    np.testing.assert_array_equal(enc.input_ids.numpy(), tokens)
    np.testing.assert_array_equal(hf_tok(TEXTS, padding="max_length", return_tensors="np").input_ids, tokens)
  with torch.no_grad():
    out = exported.hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=torch_images(x))
  for name, ours, ref in (("image_embeds", zimg, out.image_embeds), ("text_embeds", ztxt, out.text_embeds),
                          ("logits_per_image", logits, out.logits_per_image)):
    diff = np.abs(np.asarray(ours) - ref.numpy()).max()
    print(f"{exported.kind}: max |{name} - HF| = {diff:.2e}")
    assert diff <= 1e-4, name


def test_import_round_trip(exported):
  zeros = jax.tree.map(np.zeros_like, exported.params)
  back, copied = init.load_params(f"hf:{exported.out}", zeros)
  assert len(copied) == len(jax.tree.leaves(exported.params))
  if exported.kind == "siglip":
    jax.tree.map(np.testing.assert_array_equal, back, exported.params)
    return
  # CLIP: the patch bias lives in the position embedding's patch rows; everything else is bitwise.
  img, ref = back["img"], exported.params["img"]
  assert not np.asarray(img["embedding"]["bias"]).any()
  np.testing.assert_array_equal(img["pos_embedding"][:, 0], ref["pos_embedding"][:, 0])
  np.testing.assert_array_equal(img["pos_embedding"][:, 1:], ref["pos_embedding"][:, 1:] + ref["embedding"]["bias"])
  strip = lambda p: {**p, "img": {k: v for k, v in p["img"].items() if k not in ("embedding", "pos_embedding")}}
  jax.tree.map(np.testing.assert_array_equal, strip(back), strip(exported.params))
  again = twotower.state_dict(back, "clip", swap=(2, exported.tok.vocab_size - 1))
  first = twotower.state_dict(exported.params, "clip", swap=(2, exported.tok.vocab_size - 1))
  assert again.keys() == first.keys()
  for k in first:
    np.testing.assert_array_equal(again[k], first[k], err_msg=k)


def test_zero_shot_pipeline_offline(exported, monkeypatch):
  from PIL import Image
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  image = Image.fromarray((np.random.default_rng(2).random((IMAGE, IMAGE, 3)) * 255).astype(np.uint8))
  classify = transformers.pipeline("zero-shot-image-classification", model=exported.out)
  labels = ["circle", "square", "triangle"]
  res = classify(image, candidate_labels=labels, hypothesis_template="a {}")  # SigLIP: padded to 64
  assert sorted(r["label"] for r in res) == sorted(labels)
  # The pipeline's scores are our zero-shot scores for the same (HF-preprocessed) image.
  pixels = classify.image_processor(images=[image], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  tokens = exported.tok.caption_sequences([f"a {c}" for c in labels], MAX_LEN)[0]
  zimg, ztxt = exported.model.apply({"params": exported.params}, pixels, tokens)
  scale, bias = exported.model.apply({"params": exported.params}, method=TwoTower.temperature)
  logits = (np.asarray(zimg) @ np.asarray(ztxt).T * np.exp(scale) + bias)[0]
  ours = 1 / (1 + np.exp(-logits)) if exported.kind == "siglip" else np.exp(logits - logits.max()) / np.exp(
      logits - logits.max()).sum()
  got = {r["label"]: r["score"] for r in res}
  np.testing.assert_allclose([got[c] for c in labels], ours, atol=1e-4)


def test_unexportable_two_towers_are_refused():
  base = _model("siglip", 40)
  with pytest.raises(UserError, match=r"model.text.layout='bert'.*no SiglipModel/CLIPModel equivalent"):
    twotower.layout(base.clone(text={**base.text, "layout": "bert"}))
  with pytest.raises(UserError, match=r"text_pool is 'mean', but SiglipModel needs 'last_position'"):
    twotower.layout(base.clone(text={**base.text, "pool": "mean"}))
  clip = _model("clip", 40)
  with pytest.raises(UserError, match=r"proj_bias is True, but CLIPModel needs False"):
    twotower.layout(clip.clone(proj_bias=True))
