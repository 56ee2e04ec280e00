"""tf.data pipelines that yield numpy batches of this process's share of the global batch.

Train order is a pure function of (seed, step): each process reads its own even split of the
train split; epoch `e` is that split shuffled with seed (seed, e); example augmentation uses
stateless ops seeded by (seed, epoch, example index). Resuming at step `s` therefore skips
s * local_batch raw (undecoded) records and continues with exactly the batches an
uninterrupted run would have seen; no iterator state needs to be checkpointed.

Evaluation reads each split once in order, padded to whole batches with `_mask == 0` rows so
that every process runs the same number of steps.

Text (`input.text`): "caption" carries one caption per example (a random one of several
references when training; all references joined by newlines when evaluating); "qa" carries one
question/answer pair (a random pair when training; every pair as its own row when evaluating).
Texts travel through tf.data as fixed-length UTF-8 byte arrays (`caption`, `question`,
`answer`, uint8) so that every field is numeric and can be sharded and gathered across hosts;
after batching, the tokenizer adds `tokens` (and `loss_mask`, `prompt` for qa).
"""

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vlm_jax.data import preprocess, sources
from vlm_jax.data.sources import Host
from vlm_jax.data.tokenizer import texts
from vlm_jax.errors import UserError

# Keep TensorFlow off accelerators: JAX owns them.
tf.config.set_visible_devices([], "GPU")

LABEL_DTYPES = (tf.int64, tf.int32)


def _host_split(builder, split: str, host: Host) -> tuple[str, int]:
  sources.num_examples(builder, split)  # clear error for unknown splits
  sub = tfds.even_splits(split, n=host.count)[host.index]
  n = builder.info.splits[sub].num_examples
  if n == 0:
    raise UserError(f"split '{split}' of '{builder.info.full_name}' has no examples for process "
                    f"{host.index} of {host.count}. Use a larger split or fewer processes.")
  return sub, n


def _raw(builder, split: str, image_key: str) -> tf.data.Dataset:
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(add_tfds_id=False, try_autocache=False))
  opts = tf.data.Options()
  opts.deterministic = True
  return ds.with_options(opts)


def _get(ex, path: str):
  for key in path.split("/"):
    if key not in ex:
      raise UserError(f"the dataset has no feature '{path}'. Check the input.*_key settings.")
    ex = ex[key]
  return ex


def _bytes(text, inp):
  return tf.io.decode_raw(text, tf.uint8, fixed_length=inp.max_text_bytes)


def _pick(values, seed):
  """One element of a rank-1 string tensor (random with `seed`, or all joined when seed is None)."""
  if values.shape.rank == 0:
    return values
  if seed is None:
    return tf.strings.reduce_join(values, separator="\n")
  i = tf.random.stateless_uniform([], seed=seed, maxval=tf.shape(values)[0], dtype=tf.int32)
  return values[i]


def _select(ex, inp, image, seed=None):
  """The fields a task consumes: image, label (if a scalar class), texts as bytes."""
  out = {"image": image}
  if inp.label_key in ex and ex[inp.label_key].dtype in LABEL_DTYPES and ex[inp.label_key].shape.rank == 0:
    out["label"] = tf.cast(ex[inp.label_key], tf.int32)
  if inp.text == "caption":
    out["caption"] = _bytes(_pick(_get(ex, inp.caption_key), None if seed is None else seed + 2), inp)
  elif inp.text == "qa":
    q, a = _get(ex, inp.question_key), _get(ex, inp.answer_key)
    if q.shape.rank:  # one random pair per example when training (evaluation rows are single pairs)
      i = tf.random.stateless_uniform([], seed=seed + 3, maxval=tf.shape(q)[0], dtype=tf.int32)
      q, a = q[i], a[i]
    out["question"], out["answer"] = _bytes(q, inp), _bytes(a, inp)
  elif inp.text:
    raise UserError(f"input.text='{inp.text}' is unknown; use '', 'caption' or 'qa'.")
  return out


def _explode_qa(inp):
  """Evaluation: one row per question/answer pair of an example."""
  def fn(ex):
    q, a = _get(ex, inp.question_key), _get(ex, inp.answer_key)
    if q.shape.rank == 0:
      return tf.data.Dataset.from_tensors(ex)
    n = tf.shape(q)[0]
    rows = {k: tf.repeat(v[None], n, axis=0) for k, v in ex.items() if not isinstance(v, dict)}
    rows["_q"], rows["_a"] = q, a
    return tf.data.Dataset.from_tensor_slices(rows)
  return fn


@dataclasses.dataclass
class TextStats:
  """Running counts of the texts tokenised and of those cut to `input.max_len` tokens."""
  seen: int = 0
  truncated: int = 0
  warned: bool = False

  def add(self, seen: int, truncated: int, max_len: int) -> None:
    self.seen, self.truncated = self.seen + seen, self.truncated + int(truncated)
    if self.truncated and not self.warned:
      self.warned = True
      print(f"warning: texts longer than input.max_len={max_len} tokens are truncated "
            f"({self.truncated} of {self.seen} so far; counted in train/texts_truncated). "
            f"Raise --config.input.max_len to keep them whole.", flush=True)


def tokenize(batch: dict, inp, tok, train: bool, stats: TextStats = None) -> dict:
  """Adds token arrays for the task: `tokens` [B, max_len] (+ `loss_mask`, `prompt` for qa)."""
  stats = stats or TextStats(warned=True)
  if inp.text == "caption":
    first = [t.split("\n")[0] for t in texts(batch, "caption")]
    batch["tokens"], cut = tok.caption_sequences(first, inp.max_len)
    stats.add(len(first), cut, inp.max_len)
    if train:
      del batch["caption"]
  elif inp.text == "qa":
    questions, answers = texts(batch, "question"), [t.split("\n")[0] for t in texts(batch, "answer")]
    seq = tok.vqa_sequences(questions, answers, inp.max_len)
    stats.add(len(questions), seq.truncated, inp.max_len)
    batch["tokens"], batch["loss_mask"] = seq.tokens, seq.loss_mask
    if train:
      del batch["question"], batch["answer"]
    else:
      batch["prompt"], _ = tok.prompt_sequences(questions, inp.max_len)
  return batch


def train_batches(inp, data_dir: str, seed: int, local_batch: int, start_step: int = 0,
                  host: Host = Host(), tokenizer=None, stats: TextStats = None,
                  stop_step: int = None) -> Iterator[dict]:
  """Iterator of training batches from `start_step` (text counts into `stats`), up to `stop_step`
  or forever. With `stop_step` the dataset ends there, so when training ends no tf.data thread is
  busy filling the next epoch's shuffle buffer, which the iterator's teardown would wait for
  (minutes with a large buffer on a busy CPU)."""
  builder = sources.open_source(inp.data, data_dir)
  split, n = _host_split(builder, inp.train_split, host)
  raw = _raw(builder, split, inp.image_key)
  if inp.cache_decoded:  # decoded once, in the first epoch; later epochs read memory
    raw = raw.map(lambda ex: {**ex, inp.image_key: preprocess.decode_image(ex[inp.image_key])},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
  raw = raw.enumerate()
  buffer = int(min(n, inp.shuffle_buffer_size))

  def epoch(e):
    ds = raw.shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
    return ds.map(lambda i, ex: (e, i, ex))

  start_epoch, offset = divmod(start_step * local_batch, n)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(offset)

  def process(e, i, ex):
    ex_seed = tf.stack([tf.cast(seed, tf.int64) * 7919 + e, i])
    img = preprocess.train_image(ex[inp.image_key], ex_seed, inp.image_size, inp.random_crop_scale,
                                 inp.flip, inp.mean, inp.std)
    return _select(ex, inp, img, ex_seed)

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  if stop_step is not None:
    ds = ds.take(max(stop_step - start_step, 0))
  ds = ds.prefetch(inp.prefetch)
  if not inp.text:
    return ds.as_numpy_iterator()
  return (tokenize(b, inp, tokenizer, train=True, stats=stats) for b in ds.as_numpy_iterator())


def eval_batches(inp, data_dir: str, split: str, local_batch: int, host: Host = Host(), tokenizer=None):
  """Returns (num_batches, iterator over padded batches with `_mask`) for one pass over `split`."""
  builder = sources.open_source(inp.data, data_dir)
  sub, _ = _host_split(builder, split, host)
  raw = _raw(builder, sub, inp.image_key)
  if inp.text == "qa":
    raw = raw.flat_map(_explode_qa(inp))
  # Rows per process (pairs, when VQA explodes examples) decide how many padded batches all run.
  counts = [int(_raw(builder, s, inp.image_key).flat_map(_explode_qa(inp)).reduce(0, lambda c, _: c + 1))
            if inp.text == "qa" else builder.info.splits[s].num_examples
            for s in tfds.even_splits(split, n=host.count)]
  n, num_batches = counts[host.index], -(-max(counts) // local_batch)

  def process(ex):
    if "_q" in ex:
      ex = {**ex, "_pair": {"q": ex.pop("_q"), "a": ex.pop("_a")}}
      ex = _with_pair(ex, inp)
    out = _select(ex, inp, preprocess.eval_image(ex[inp.image_key], inp.image_size, inp.mean, inp.std))
    out["_mask"] = tf.constant(1, tf.int32)
    return out

  ds = raw.map(process, num_parallel_calls=tf.data.AUTOTUNE)
  pad = ds.take(1).map(lambda ex: {**ex, "_mask": tf.constant(0, tf.int32)}).repeat(num_batches * local_batch - n)
  ds = ds.concatenate(pad).batch(local_batch).prefetch(inp.prefetch)
  if not inp.text:
    return num_batches, ds.as_numpy_iterator()
  return num_batches, (tokenize(b, inp, tokenizer, train=False) for b in ds.as_numpy_iterator())


def _with_pair(ex, inp):
  """Puts an exploded pair back under the question/answer feature paths."""
  pair = ex.pop("_pair")
  for path, value in ((inp.question_key, pair["q"]), (inp.answer_key, pair["a"])):
    node, keys = ex, path.split("/")
    for key in keys[:-1]:
      node[key] = dict(node.get(key, {}))
      node = node[key]
    node[keys[-1]] = value
  return ex
