"""Contrastive image-text training (CLIP softmax or SigLIP sigmoid loss) with a `TwoTower` model.

Losses are over the GLOBAL batch, but no device ever holds the global [B, B] logit matrix:
inside `jax.shard_map` over the data-parallel axes each device keeps its own image embeddings
and sees the text embeddings of one peer at a time, passed around a ring with `lax.ppermute`
(big_vision's chunked SigLIP). Each step of the ring is rematerialised, so the backward pass
keeps only the text chunks (B_global x E per device), never more than one [b, b] block of
logits (b = per-device batch).
- sigmoid (SigLIP): sum over all pairs of -log sigmoid(z * (cos * exp(t) + bias)), z = +1 on
  matching pairs and -1 elsewhere, divided by the global batch (as HF `SiglipModel` /
  big_vision); positives all lie in each device's own block.
- softmax (CLIP): mean of image->text and text->image cross-entropy. Row log-sum-exps accumulate
  on the device that owns the images; column log-sum-exps travel with their text chunk and go
  home with one last ppermute.
`sigmoid_loss` / `softmax_loss` are the single-device references (full matrix); the tests show
the sharded losses and their gradients equal them.

Evaluation (`SPLIT/i2t_recall@K`, `SPLIT/t2i_recall@K` for K = 1, 5, 10, and with class labels
`SPLIT/zeroshot_accuracy`): embeddings of every example of the split are gathered to the host;
see `retrieval_metrics` and `Task.predict_fn` for how matches and zero-shot prompts are built.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vlm_jax import flops, init
from vlm_jax.data import features, tokenizer as tokenizer_lib, tokenizer_source
from vlm_jax.errors import UserError
from vlm_jax.hf import bert, twotower as hf_twotower
from vlm_jax.metrics import retrieval
from vlm_jax.models.text import TextEncoder
from vlm_jax.models.vit import ViT
from vlm_jax.models.vlm import TwoTower
from vlm_jax.optim import param_path
from vlm_jax.parallel import BATCH_AXES
from vlm_jax.tasks import base
from vlm_jax.tasks.common import encode_captions, module_kwargs

LOSSES = ("sigmoid", "softmax")


# -- losses ----------------------------------------------------------------------------------------
def sigmoid_loss(zimg, ztxt, logit_scale, logit_bias):
  """Single-device SigLIP loss over the full [B, B] logits (the reference)."""
  logits = zimg @ ztxt.T * jnp.exp(logit_scale) + logit_bias
  labels = 2 * jnp.eye(zimg.shape[0]) - 1
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / zimg.shape[0]


def softmax_loss(zimg, ztxt, logit_scale, logit_bias=0.0):
  """Single-device CLIP loss over the full [B, B] logits (the reference); the bias cancels out."""
  logits = zimg @ ztxt.T * jnp.exp(logit_scale) + logit_bias
  pos = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - pos
  t2i = jax.nn.logsumexp(logits, axis=0) - pos
  return (i2t.mean() + t2i.mean()) / 2


def _ring_sigmoid(zimg, ztxt, scale, bias, axes, n):
  """Per-device body: own block (with the positives), then n - 1 peers' text chunks."""
  perm = [(i, (i + 1) % n) for i in range(n)]
  own = zimg @ ztxt.T * scale + bias
  total = -jnp.sum(jax.nn.log_sigmoid((2 * jnp.eye(own.shape[0]) - 1) * own))

  def step(carry, _):
    txt, acc = carry
    txt = jax.lax.ppermute(txt, axes, perm)
    acc = acc - jnp.sum(jax.nn.log_sigmoid(-(zimg @ txt.T * scale + bias)))
    return (txt, acc), None

  (_, total), _ = jax.lax.scan(jax.checkpoint(step), (ztxt, total), None, length=n - 1)
  return jax.lax.psum(total, axes) / (zimg.shape[0] * n)


def _ring_softmax(zimg, ztxt, scale, bias, axes, n):
  perm = [(i, (i + 1) % n) for i in range(n)]
  own = zimg @ ztxt.T * scale + bias
  pos = jnp.diagonal(own)
  rows, cols = jax.nn.logsumexp(own, axis=1), jax.nn.logsumexp(own, axis=0)

  def step(carry, _):
    txt, cols, rows = carry
    txt, cols = jax.lax.ppermute((txt, cols), axes, perm)
    block = zimg @ txt.T * scale + bias
    return (txt, jnp.logaddexp(cols, jax.nn.logsumexp(block, axis=0)),
            jnp.logaddexp(rows, jax.nn.logsumexp(block, axis=1))), None

  (_, cols, rows), _ = jax.lax.scan(jax.checkpoint(step), (ztxt, cols, rows), None, length=n - 1)
  if n > 1:  # the column sums of chunk d sit on device d - 1: one hop home
    cols = jax.lax.ppermute(cols, axes, perm)
  total = jnp.sum(rows - pos) + jnp.sum(cols - pos)
  return jax.lax.psum(total, axes) / (2 * zimg.shape[0] * n)


def sharded_loss(kind: str, zimg, ztxt, logit_scale, logit_bias):
  """The global-batch loss of embeddings sharded over the mesh's batch axes (ring, see above).

  Runs under the mesh set by `jax.set_mesh`; without a mesh (or on one device) it is the
  single-device reference.
  """
  body = {"sigmoid": _ring_sigmoid, "softmax": _ring_softmax}[kind]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return {"sigmoid": sigmoid_loss, "softmax": softmax_loss}[kind](zimg, ztxt, logit_scale, logit_bias)
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  n = math.prod(mesh.shape[a] for a in axes)
  fn = jax.shard_map(lambda i, t, s, b: body(i, t, jnp.exp(s), b, axes, n), mesh=mesh,
                     in_specs=(P(axes), P(axes), P(), P()), out_specs=P())
  return fn(zimg.astype(jnp.float32), ztxt.astype(jnp.float32), logit_scale, logit_bias)


# -- evaluation ------------------------------------------------------------------------------------
def retrieval_metrics(img_emb, txt_emb, texts, refs, ks=(1, 5, 10)) -> dict:
  """Recall@K both ways over a split: example i's image vs example j's (first) caption.

  Image i matches text j when j == i or when j's caption text is identical to one of i's
  references: a split where two images share the caption "a large red circle at the center"
  counts either caption as correct for both images (and both images for either caption), since
  nothing tells them apart. `texts[j]` is the caption that was embedded, `refs[i]` all references.
  """
  ids = {}
  text_ids = np.array([ids.setdefault(t, len(ids)) for t in texts])
  match = np.zeros((len(refs), len(texts)), bool)
  for i, rs in enumerate(refs):
    match[i] = np.isin(text_ids, [ids[r] for r in rs if r in ids])
  match[np.arange(len(texts)), np.arange(len(texts))] = True
  return retrieval.recall_at_k(np.asarray(img_emb) @ np.asarray(txt_emb).T, match, ks)


class Task(base.Task):
  name = "contrastive"
  collects_predictions = True  # evaluation gathers the embeddings of every batch
  hf_family = hf_twotower

  @classmethod
  def validate(cls, cfg) -> None:
    if cfg.input.get("text", "") != "caption":
      raise UserError(f"config: task 'contrastive' needs input.text='caption', got '{cfg.input.get('text', '')}'.")

  def __init__(self, cfg, data_info):
    inp, m = cfg.input, cfg.model
    self.cfg, self.loss_kind = cfg, m.get("loss", "sigmoid")
    if self.loss_kind not in LOSSES:
      raise UserError(f"model.loss='{self.loss_kind}' is unknown; use {' or '.join(LOSSES)}.")
    shared = {k: m[k] for k in ("dtype", "param_dtype", "dtype_mm", "attention") if k in m}
    img = module_kwargs({**m.image.to_dict(), **shared}, ViT)
    txt = module_kwargs({**m.text.to_dict(), **shared}, TextEncoder)
    self.text_init = m.get("text_init", "")
    self.image_init = m.get("image_init", "")
    if txt.get("layout") == "bert" or self.text_init:
      self.tokenizer = bert.BertTokenizer.load(inp.tokenizer) if inp.tokenizer else \
          bert.BertTokenizer.from_dir(bert.resolve_dir(self.text_init))
    else:
      self.tokenizer = tokenizer_source.for_run(cfg)
    txt.setdefault("vocab_size", self.tokenizer.vocab_size)
    if txt["vocab_size"] < self.tokenizer.vocab_size:
      raise UserError(f"model.text.vocab_size={txt['vocab_size']} is smaller than the tokenizer's "
                      f"{self.tokenizer.vocab_size} ids. Raise it or remove it (it defaults to the tokenizer's).")
    txt["pad_id"] = self.tokenizer.pad_id
    txt.setdefault("max_len", inp.max_len)
    if txt["max_len"] < inp.max_len:
      raise UserError(f"model.text.max_len={txt['max_len']} is shorter than input.max_len={inp.max_len}.")
    heads = dict(embed_dim=m.get("embed_dim", 0), image_proj=m.get("image_proj", False),
                 text_proj=m.get("text_proj", True), proj_bias=m.get("proj_bias", True),
                 logit_scale_init=float(m.get("logit_scale_init", math.log(10.0))),
                 logit_bias_init=float(m.get("logit_bias_init", -10.0)) if self.loss_kind == "sigmoid" else None)
    self.model = TwoTower(image=img, text=txt, **heads, **module_kwargs(shared, exclude=("attention",)))
    self.class_names = data_info.class_names if data_info.num_classes else None
    self.text_fields = ("caption", "label") if self.class_names else ("caption",)  # gathered for collect
    self.prompts = None
    if self.class_names:
      templates = list(cfg.evals.get("zeroshot_templates", ("a photo of a {}.",)))
      texts = [t.format(c) for c in self.class_names for t in templates]
      self.prompts = self.tokenizer.caption_sequences(texts, inp.max_len)[0].reshape(
          len(self.class_names), len(templates), inp.max_len)

  def features(self, inp) -> tuple:
    return (features.Label(inp.label_key), features.Texts(inp.caption_key))

  def encode(self, batch: dict, train: bool, stats) -> dict:
    return encode_captions(batch, self.tokenizer, self.cfg.input.max_len, train, stats)

  def flops(self, example, global_batch):
    return flops.two_tower_forward(self.model, example["image"].shape[1], example["tokens"].shape[1],
                                   global_batch or example["image"].shape[0])

  def _dummy(self, n):
    s, L = self.cfg.input.image_size, self.cfg.input.max_len
    return np.zeros((n, s, s, 3), np.float32), np.zeros((n, L), np.int32)

  def dummy_batch(self, n: int) -> dict:
    image, tokens = self._dummy(n)
    return {"image": image, "tokens": tokens}

  def init(self, rng, batch):
    try:
      return self.model.init({"params": rng}, batch["image"], batch["tokens"])["params"]
    except ValueError as e:  # tower widths vs embed_dim, pools: configuration mistakes
      raise UserError(f"model config does not fit the two-tower model: {e}.") from None

  def _temperature(self, params):
    return self.model.apply({"params": params}, method=TwoTower.temperature)

  def _locked(self, params) -> tuple:
    """Towers every parameter of which `optimizer.freeze` matches: run without backward pass."""
    freeze = self.cfg.optimizer.get("freeze", "")
    if not freeze:
      return ()
    rx = re.compile(freeze)
    return tuple(t for t in ("img", "txt") if all(
        rx.search(f"{t}/{param_path(p)}") for p, _ in jax.tree_util.tree_flatten_with_path(params[t])[0]))

  def loss_fn(self, params, batch, rng):
    zimg, ztxt = self.model.apply({"params": params}, batch["image"], batch["tokens"], train=True,
                                  locked=self._locked(params), rngs={"dropout": rng})
    scale, bias = self._temperature(params)
    loss = sharded_loss(self.loss_kind, zimg, ztxt, scale, bias)
    metrics = {"loss": loss, "logit_scale": scale}
    if self.loss_kind == "sigmoid":
      metrics["logit_bias"] = bias
    return loss, metrics

  def eval_fn(self, params, batch):
    return {"count": batch["_mask"].sum()}

  def _class_embeddings(self, params):
    c, t, L = self.prompts.shape
    emb = self.model.apply({"params": params}, jnp.asarray(self.prompts.reshape(c * t, L)),
                           method=TwoTower.encode_text).reshape(c, t, -1).mean(1)
    return emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)

  def predict_fn(self, params, batch):
    """Embeddings (image, and text when the batch has tokens); with class names also the zero-shot
    label: the class whose prompts (`evals.zeroshot_templates` filled with the class name; their
    embeddings averaged) are most similar to the image, and its softmax probability over classes."""
    out = {"img_emb": self.model.apply({"params": params}, batch["image"], method=TwoTower.encode_image)}
    if "tokens" in batch:
      out["txt_emb"] = self.model.apply({"params": params}, batch["tokens"], method=TwoTower.encode_text)
    if self.prompts is not None:
      scale, _ = self._temperature(params)
      probs = jax.nn.softmax(out["img_emb"] @ self._class_embeddings(params).T * jnp.exp(scale), axis=-1)
      out["label"], out["prob"] = probs.argmax(-1), probs.max(-1)
    return out

  def collect(self, batch, preds) -> list:
    """Host side: (image embedding, text embedding, references, (label, predicted) or None) per real row."""
    keep = np.asarray(batch["_mask"]) == 1
    refs = tokenizer_lib.texts(batch, "caption")
    labels = batch.get("label")
    out = []
    for i in np.flatnonzero(keep):
      zs = (int(labels[i]), int(preds["label"][i])) if labels is not None and "label" in preds else None
      out.append((preds["img_emb"][i], preds["txt_emb"][i], refs[i].split("\n"), zs))
    return out

  def summarize(self, sums, records=()) -> dict:
    if not records:
      return {}
    img, txt, refs, zs = zip(*records)
    out = retrieval_metrics(np.stack(img), np.stack(txt), [r[0] for r in refs], refs)
    if zs[0] is not None:
      out["zeroshot_accuracy"] = float(np.mean([a == b for a, b in zs]))
    return out

  def format(self, preds, image_sizes=None) -> list:
    if "label" not in preds:
      raise UserError("this two-tower run has no class names to predict: zero-shot labels need a dataset "
                      "with a ClassLabel under input.label_key.")
    return [f"{self.class_names[int(i)]} ({p:.3f})" for i, p in zip(preds["label"], preds["prob"])]

  def draw(self, batch, preds):
    """Each drawn image with the best-matching caption among the drawn examples."""
    refs = [r.split("\n")[0] for r in tokenizer_lib.texts(batch, "caption")]
    sim = np.asarray(preds["img_emb"]) @ np.asarray(preds["txt_emb"]).T
    items = []
    for i, img in enumerate(batch["image"]):
      j = int(sim[i].argmax())
      ok = refs[j] == refs[i]
      items.append((img, refs[j] if ok else f"{refs[j]}\ntrue: {refs[i]}", ok))
    return items

  # -- pretrained towers ---------------------------------------------------------------------------
  def load_pretrained(self, params) -> tuple:
    """Loads `model.text_init` (a Hugging Face BERT directory) into `txt/` and `model.image_init`
    (a ViT classification run's workdir[:STEP]) into `img/`; returns (params, copied paths)."""
    params, copied = dict(params), []
    if self.text_init:
      hf_dir = bert.resolve_dir(self.text_init)
      txt = bert.load_text_encoder(hf_dir, self.model.text, params["txt"])
      params["txt"] = txt
      copied += [f"txt/{param_path(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(txt)[0]]
    if self.image_init:
      img, names = init.load_params(self.image_init, params["img"])
      params["img"] = img
      copied += [f"img/{p}" for p in names]
    return params, copied
