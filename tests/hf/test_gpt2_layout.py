"""Decoder <-> Hugging Face GPT-2 (cross-attention): weights copied either way give the same logits.

Shapes cannot alias: mlp 48 != 4 * 32, vocab 53 != width 32, 4 heads.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tests run in the Python 3.11 CI lane (requirements-lowest.txt)")
transformers = pytest.importorskip("transformers")

from vlm_jax.hf.gpt2 import decoder_from_gpt2_state_dict, decoder_to_gpt2_state_dict  # noqa: E402
from vlm_jax.models.text import Decoder  # noqa: E402

D, DEPTH, HEADS, MLP, VOCAB, POS = 32, 2, 4, 48, 53, 16
B, T, N = 2, 11, 6


def _gpt2(tie=True):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(add_cross_attention=True, n_embd=D, n_layer=DEPTH, n_head=HEADS, n_inner=MLP,
                                vocab_size=VOCAB, n_positions=POS, activation_function="gelu_new",
                                tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # HF initialises biases and LayerNorms to constants: randomise them too
    for name, p in model.named_parameters():
      if name.endswith("bias") or ".ln" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _decoder(tie=True, scan=True):
  return Decoder(vocab_size=VOCAB, width=D, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, max_len=POS,
                 ln_eps=1e-5, gelu_approximate=True, tie_embeddings=tie, scan_layers=scan)


def _inputs():
  rng = np.random.default_rng(0)
  return rng.integers(0, VOCAB, (B, T)), rng.standard_normal((B, N, D)).astype(np.float32)


def _hf_logits(model, tokens, encoded):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens), encoder_hidden_states=torch.from_numpy(encoded))
  return out.logits.numpy()


@pytest.mark.parametrize("tie,scan", [(True, True), (False, False)])
def test_decoder_matches_gpt2_both_ways(tie, scan):
  hf = _gpt2(tie)
  tokens, encoded = _inputs()
  ref = _hf_logits(hf, tokens, encoded)
  params = decoder_from_gpt2_state_dict(hf.state_dict(), DEPTH, HEADS, scan_layers=scan)
  assert ("head" in params) == (not tie)
  dec = _decoder(tie, scan)
  expected = jax.tree.map(jnp.shape, nn.meta.unbox(jax.eval_shape(dec.init, jax.random.PRNGKey(0), tokens,
                                                                   encoded))["params"])
  assert jax.tree.map(jnp.shape, params) == expected
  ours = np.asarray(dec.apply({"params": params}, tokens, encoded))
  diff = float(np.abs(ours - ref).max())
  print(f"max |logits - GPT-2 logits| = {diff:.2e}")
  assert diff <= 1e-4

  sd = decoder_to_gpt2_state_dict(params)
  fresh = _gpt2(tie)
  for p in fresh.parameters():  # make sure nothing of the original survives
    torch.nn.init.zeros_(p)
  missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert not missing and not unexpected
  np.testing.assert_array_equal(_hf_logits(fresh, tokens, encoded), ref)
  for k, v in hf.state_dict().items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_enc_proj_matches_vision_encoder_decoder():
  """A wider encoder: our `enc_proj` is VisionEncoderDecoderModel's `enc_to_dec_proj`."""
  enc_cfg = transformers.ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=40, image_size=16, patch_size=8)
  torch.manual_seed(1)
  ved = transformers.VisionEncoderDecoderModel(encoder=transformers.ViTModel(enc_cfg, add_pooling_layer=False),
                                               decoder=_gpt2()).eval()
  tokens, _ = _inputs()
  pixels = torch.randn(B, 3, 16, 16)
  with torch.no_grad():
    ref = ved(pixel_values=pixels, decoder_input_ids=torch.from_numpy(tokens))
    encoded = ved.encoder(pixel_values=pixels).last_hidden_state.numpy()
  params = decoder_from_gpt2_state_dict(ved.state_dict(), DEPTH, HEADS)
  assert params["enc_proj"]["kernel"].shape == (24, D)
  ours = np.asarray(_decoder().apply({"params": params}, tokens, encoded))
  assert float(np.abs(ours - ref.logits.numpy()).max()) <= 1e-4
  sd = decoder_to_gpt2_state_dict(params)
  np.testing.assert_array_equal(sd["enc_to_dec_proj.weight"], ved.state_dict()["enc_to_dec_proj.weight"].numpy())


class _DecoderOnly(nn.Module):
  """The decoding interface of a Captioner whose "images" are already encoder states."""
  text_max_len = POS

  def setup(self):
    self.txt = _decoder()

  def encode(self, x):
    return x

  def decode(self, tokens, encoded, *, causal=True, decode=False, train=False):
    return self.txt(tokens, encoded, causal=causal, decode=decode)


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_matches_hf_generate(beams):
  """Greedy / beam search (alpha 0) pick the tokens HF `generate` picks with the same weights."""
  from vlm_jax import decode
  hf = _gpt2()
  with torch.no_grad():  # sharper distributions, so that no choice hinges on rounding
    for p in hf.parameters():
      if p.ndim > 1:
        p.mul_(3.0)
  params = {"txt": decoder_from_gpt2_state_dict(hf.state_dict(), DEPTH, HEADS)}
  encoded = np.random.default_rng(0).standard_normal((3, N, D)).astype(np.float32)
  prompt = np.array([[1, 5, 9], [1, 7, 7], [1, 30, 4]])
  eos, new = 11, 10
  for pr in (prompt[:, :1], prompt):
    if beams == 1:
      ours = decode.greedy(_DecoderOnly(), params, jnp.asarray(encoded), jnp.asarray(pr), max_len=new, eos_id=eos)
    else:
      ours = decode.beam_search(_DecoderOnly(), params, jnp.asarray(encoded), jnp.asarray(pr), max_len=new,
                                beam_size=beams, alpha=0.0, eos_id=eos)
    with torch.no_grad():
      ref = hf.generate(torch.from_numpy(pr), attention_mask=torch.ones(pr.shape, dtype=torch.long),
                        encoder_hidden_states=torch.from_numpy(encoded), num_beams=beams, do_sample=False,
                        max_new_tokens=new, length_penalty=0.0, early_stopping=False, eos_token_id=eos,
                        pad_token_id=0).numpy()[:, pr.shape[1]:]
    ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])))
    ref[np.cumsum(ref == eos, axis=1) - (ref == eos) > 0] = 0  # HF may fill after EOS with EOS: make it PAD
    np.testing.assert_array_equal(np.asarray(ours), ref)
