"""Captioner <-> Hugging Face VisionEncoderDecoderModel on random tiny models: logits equal (<= 1e-4),
greedy `generate` gives our greedy tokens exactly (captions and a VQA prompt), import is bitwise.

Two encoders: SigLIP layout (pool 'none', width 48 -> enc_to_dec_proj to the decoder's 32, untied
head, scanned) and ViT layout (pool 'cls', same width, tied head, unrolled).
"""

import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tests run in the Python 3.11 CI lane (requirements-lowest.txt)")
transformers = pytest.importorskip("transformers")

from tests.hf.helpers import IMAGE, images, make_run, random_params, torch_images  # noqa: E402
from vlm_jax import decode, init  # noqa: E402
from vlm_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from vlm_jax.hf import export  # noqa: E402
from vlm_jax.models.vlm import Captioner  # noqa: E402

DECODE_LEN = 7
TEXTS = ["a red circle left of a blue square", "what color is the circle?", "two green triangles", "yes no"]


def _tokenizer():
  return tokenizer_lib.train_tokenizer(TEXTS, vocab_size=60, kind="wordlevel")


def _captioner(pool, enc_width, tie, scan, vocab):
  enc = dict(patch_size=8, width=enc_width, depth=1, num_heads=4, mlp_dim=40, pool=pool, ln_eps=1e-6,
             gelu_approximate=False, scan_layers=scan)
  dec = dict(vocab_size=vocab, width=32, depth=2, num_heads=2, mlp_dim=48, max_len=20, ln_eps=1e-5,
             gelu_approximate=True, tie_embeddings=tie, scan_layers=scan)
  return Captioner(encoder=enc, decoder=dec)


@pytest.fixture(scope="module", params=[("none", 48, False, True), ("cls", 32, True, False)],
                ids=["siglip-encoder", "vit-encoder"])
def exported(request, tmp_path_factory):
  tok = _tokenizer()
  model = _captioner(*request.param, tok.vocab_size)
  x = np.zeros((1, IMAGE, IMAGE, 3), np.float32)
  params = random_params(model, x, np.zeros((1, 4), np.int32), scale=0.3)
  out = str(tmp_path_factory.mktemp("ved") / "hf")
  run = make_run(model, params, task="captioning", tokenizer=tok, decode_len=DECODE_LEN)
  assert export.write(run, out) == "VisionEncoderDecoderModel"
  hf, info = transformers.VisionEncoderDecoderModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return types.SimpleNamespace(model=model, params=params, tok=tok, out=out, hf=hf.eval(), pool=request.param[0])


def test_logits_match(exported):
  x = images()
  tokens = np.random.default_rng(0).integers(0, exported.tok.vocab_size, (2, 9))
  ours = np.asarray(exported.model.apply({"params": exported.params}, x, tokens))
  with torch.no_grad():
    ref = exported.hf(pixel_values=torch_images(x), decoder_input_ids=torch.from_numpy(tokens)).logits.numpy()
  diff = np.abs(ours - ref).max()
  print(f"{exported.pool}: max |logits - HF logits| = {diff:.2e}")
  assert diff <= 1e-4
  assert ("enc_proj" in exported.params["txt"]) == (exported.pool == "none")


def test_greedy_generate_equals_ours_token_for_token(exported):
  x = images()
  tok = exported.tok
  ours = np.asarray(decode.greedy(exported.model, exported.params, x, max_len=DECODE_LEN, bos_id=tok.bos_id,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id))
  with torch.no_grad():  # generation_config.json: BOS start, EOS/PAD ids, max_new_tokens, greedy
    hf = exported.hf.generate(pixel_values=torch_images(x)).numpy()
  assert hf.shape[1] <= DECODE_LEN + 1
  for o, h in zip(ours, hf):
    assert h[0] == tok.bos_id
    n = len(h) - 1
    np.testing.assert_array_equal(o[:n], h[1:])  # HF pads stopped rows with pad_id, as we do
    assert (o[n:] == tok.pad_id).all()

  # VQA: the prompt [BOS] question [SEP] goes in as decoder_input_ids (one question at a time).
  q = "what color is the circle?"
  prompt, _ = tok.prompt_sequences([q], 12)
  plen = int((prompt[0] != tok.pad_id).sum())
  ours = np.asarray(decode.greedy(exported.model, exported.params, x[:1], prompt, max_len=4, bos_id=tok.bos_id,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id))[0]
  hf_tok = transformers.AutoTokenizer.from_pretrained(exported.out)
  ids = [hf_tok.bos_token_id] + hf_tok(q, add_special_tokens=False).input_ids + [hf_tok.sep_token_id]
  assert ids == prompt[0, :plen].tolist()
  with torch.no_grad():
    hf = exported.hf.generate(pixel_values=torch_images(x[:1]), decoder_input_ids=torch.tensor([ids]),
                              max_new_tokens=4).numpy()[0]
  answer = hf[plen:]
  np.testing.assert_array_equal(ours[:len(answer)], answer)


def test_import_round_trip_is_bitwise(exported):
  zeros = jax.tree.map(np.zeros_like, exported.params)
  back, copied = init.load_params(f"hf:{exported.out}", zeros)
  assert len(copied) == len(jax.tree.leaves(exported.params))
  jax.tree.map(np.testing.assert_array_equal, back, exported.params)


def test_import_into_a_decoder_of_another_size_fails(exported):
  other = Captioner(encoder=exported.model.encoder, decoder={**exported.model.decoder, "depth": 1})
  target = random_params(other, images(), np.zeros((2, 4), np.int32))
  from vlm_jax.errors import UserError
  with pytest.raises(UserError, match=r"is a different size: its depth is 2, this config builds 1"):
    init.load_params(f"hf:{exported.out}", target)
