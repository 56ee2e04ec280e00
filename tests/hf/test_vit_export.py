"""ViT family <-> Hugging Face: every pooling that HF can express exports to the exact class, loads
with nothing missing or unexpected, gives the same outputs (float32, <= 1e-4), and imports back
bit for bit. Shapes cannot alias: width 32 != mlp 48, 4 heads, 5 classes, 16 patches + 1.
"""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch", reason="the PyTorch parity tests run in the Python 3.11 CI lane (requirements-lowest.txt)")
transformers = pytest.importorskip("transformers")

from tests.hf.helpers import IMAGE, images, make_run, random_params, torch_images  # noqa: E402
from vlm_jax import init  # noqa: E402
from vlm_jax.errors import UserError  # noqa: E402
from vlm_jax.hf import export, vit  # noqa: E402
from vlm_jax.models.vit import ViT, resize_posemb  # noqa: E402

CLASSES = ["circle", "square", "triangle", "diamond", "star"]
ARCH = dict(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=48)


def _model(pool, classes, scan, approx, eps):
  return ViT(num_classes=classes, pool=pool, scan_layers=scan, gelu_approximate=approx, ln_eps=eps, **ARCH)


def _init(model, seed=0, size=IMAGE):
  return random_params(model, np.zeros((1, size, size, 3), np.float32), seed=seed)


CASES = [  # pool, classifier, scan, tanh GELU, ln_eps, expected HF class
    ("cls", True, True, False, 1e-12, "ViTForImageClassification"),
    ("gap", True, False, True, 1e-6, "SiglipForImageClassification"),
    ("cls", False, False, True, 1e-6, "ViTModel"),
    ("map", False, True, False, 1e-5, "SiglipVisionModel"),
    ("none", False, True, True, 1e-6, "SiglipVisionModel"),
]


@pytest.mark.parametrize("pool,classifier,scan,approx,eps,hf_name", CASES)
def test_vit_export_matches_hf_and_round_trips(tmp_path, pool, classifier, scan, approx, eps, hf_name):
  model = _model(pool, len(CLASSES) if classifier else 0, scan, approx, eps)
  params = _init(model)
  out = str(tmp_path / "hf")
  run = make_run(model, params, class_names=CLASSES if classifier else None)
  assert export.write(run, out) == hf_name
  hf, info = getattr(transformers, hf_name).from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  with torch.no_grad():
    ref = hf(pixel_values=torch_images(images()))
  ours, aux = model.apply({"params": params}, images())
  if classifier:
    assert hf.config.id2label == dict(enumerate(CLASSES))
    diff = np.abs(np.asarray(ours) - ref.logits.numpy()).max()
  else:
    diff = np.abs(np.asarray(aux["tokens"]) - ref.last_hidden_state.numpy()).max()
    if pool in ("cls", "map"):  # the HF pooler output is our pooled vector
      diff = max(diff, np.abs(np.asarray(ours) - ref.pooler_output.numpy()).max())
  print(f"{hf_name} pool={pool}: max |ours - HF| = {diff:.2e}")
  assert diff <= 1e-4

  back, copied = init.load_params(f"hf:{out}", jax.tree.map(np.zeros_like, params))
  assert len(copied) == len(jax.tree.leaves(params))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_import_hf_saved_vit_into_gap_model_at_another_resolution(tmp_path):
  """A ViTModel saved by transformers itself (as DINO/ViT weights are) initialises our ViT: exact with
  pool='cls' at the same size; a gap model drops the class token and resizes the position grid."""
  cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                               patch_size=8, image_size=IMAGE, layer_norm_eps=1e-12)
  torch.manual_seed(0)
  hf = transformers.ViTModel(cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(str(tmp_path / "dino"))
  same = _model("cls", 0, True, False, 1e-12)
  params, copied = init.load_params(f"hf:{tmp_path / 'dino'}", _init(same, 1))
  x = np.random.default_rng(2).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(pixel_values=torch_images(x)).last_hidden_state.numpy()
  _, aux = same.apply({"params": params}, x)
  assert np.abs(np.asarray(aux["tokens"]) - ref).max() <= 1e-4

  gap = ViT(num_classes=3, pool="gap", scan_layers=False, ln_eps=1e-12, **ARCH)
  target = _init(gap, size=48)
  params, copied = init.load_params(f"hf:{tmp_path / 'dino'}", target, include="^(embedding|encoder|pos)")
  assert "pos_embedding" in copied and not any(c.startswith("head") for c in copied)
  assert params["pos_embedding"].shape == (1, 36, 32)
  saved = load_file(str(tmp_path / "dino" / "model.safetensors"))
  # The class token's row is dropped, not interpolated into the grid (tests/test_train.py checks
  # the interpolation itself against a numpy reference).
  np.testing.assert_array_equal(params["pos_embedding"],
                                resize_posemb(saved["embeddings.position_embeddings"][:, 1:], 36, 0))
  np.testing.assert_array_equal(params["encoder"]["layers_1"]["mlp"]["fc2"]["bias"],
                                saved["encoder.layer.1.output.dense.bias"])


def test_unexportable_pool_fails_with_one_message_and_writes_nothing(tmp_path):
  model = _model("map", 5, True, False, 1e-6)
  out = tmp_path / "hf"
  out.mkdir()
  with pytest.raises(UserError, match=r"model.pool='map' with a classification head has no Hugging Face"):
    export.write(make_run(model, _init(model)), str(out))
  assert not list(out.iterdir())
  assert vit.layout_for_pool("map", classifier=False) == "siglip"  # its encoder alone exports


def test_import_refuses_other_architectures_and_sizes(tmp_path):
  model = _model("cls", 5, True, False, 1e-6)
  params = _init(model)
  export.write(make_run(model, params, class_names=CLASSES), str(tmp_path / "vit"))
  wider = ViT(num_classes=5, pool="cls", patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=48)
  target = _init(wider)
  with pytest.raises(UserError, match=r"is a different size: its width is 32, this config builds 64"):
    init.load_params(f"hf:{tmp_path / 'vit'}", target)
  gpt2 = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=11, n_positions=8)
  transformers.GPT2LMHeadModel(gpt2).save_pretrained(str(tmp_path / "gpt2"))
  with pytest.raises(UserError, match=r"model_type 'gpt2' cannot initialise this model"):
    init.load_params(f"hf:{tmp_path / 'gpt2'}", params)
  with pytest.raises(UserError, match=r"has no config.json"):
    init.load_params(f"hf:{tmp_path / 'nothing'}", params)
