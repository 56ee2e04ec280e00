"""tf.data pipelines that yield numpy batches of this process's share of the global batch.

Train order is a pure function of (seed, step): each process reads its own even split of the
train split; epoch `e` is that split shuffled with seed (seed, e); example augmentation uses
stateless ops seeded by (seed, epoch, example index). Resuming at step `s` therefore skips
s * local_batch raw (undecoded) records and continues with exactly the batches an
uninterrupted run would have seen; no iterator state needs to be checkpointed.

Evaluation reads each split once in order, padded to whole batches with `_mask == 0` rows so
that every process runs the same number of steps.

What a batch holds besides `image` is given by the task's feature specs (`data/features.py`;
default: the class label). After batching, the task's `encode(batch, train, stats)` callable
turns the numpy batch's texts into token arrays. Neither knows which task it serves.
"""

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vlm_jax.data import feature_select, features as features_lib, preprocess, sources
from vlm_jax.data.sources import Host
from vlm_jax.errors import UserError

# Keep TensorFlow off accelerators: JAX owns them.
tf.config.set_visible_devices([], "GPU")


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


def _select(ex, features, image, max_text_bytes, seed=None):
  """The image and the fields of the task's feature specs."""
  out = {"image": image}
  for spec in features:
    out.update(feature_select.select(spec, ex, seed, max_text_bytes))
  return out


def _explode(paths):
  """Evaluation: one row per element of the features at `paths` (their first axis)."""
  def fn(ex):
    values = [feature_select.get(ex, p) for p in paths]
    if values[0].shape.rank == 0:
      return tf.data.Dataset.from_tensors(ex)
    n = tf.shape(values[0])[0]
    rows = tf.nest.map_structure(lambda v: tf.repeat(v[None], n, axis=0), ex)
    for i, v in enumerate(values):
      rows[f"_x{i}"] = v
    return tf.data.Dataset.from_tensor_slices(rows)
  return fn


def _put_back(ex, paths):
  """Puts a row's exploded elements back under their feature paths."""
  for i, path in enumerate(paths):
    value = ex.pop(f"_x{i}")
    node, keys = ex, path.split("/")
    for key in keys[:-1]:
      node[key] = dict(node[key])
      node = node[key]
    node[keys[-1]] = value
  return ex


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


def train_batches(inp, data_dir: str, seed: int, local_batch: int, start_step: int = 0,
                  host: Host = Host(), features=None, encode=None, stats: TextStats = None,
                  stop_step: int = None) -> Iterator[dict]:
  """Iterator of training batches from `start_step`, up to `stop_step` or forever: the image and
  the fields of the feature specs `features`, then `encode(batch, True, stats)` if given. With
  `stop_step` the dataset ends there, so when training ends no tf.data thread is busy filling the
  next epoch's shuffle buffer, which the iterator's teardown would wait for (minutes with a large
  buffer on a busy CPU)."""
  features = _default(features, inp)
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
    return _select(ex, features, img, inp.max_text_bytes, ex_seed)

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  if stop_step is not None:
    ds = ds.take(max(stop_step - start_step, 0))
  ds = ds.prefetch(inp.prefetch)
  if encode is None:
    return ds.as_numpy_iterator()
  stats = stats or TextStats(warned=True)
  return (encode(b, True, stats) for b in ds.as_numpy_iterator())


def eval_batches(inp, data_dir: str, split: str, local_batch: int, host: Host = Host(), features=None,
                 encode=None):
  """Returns (num_batches, iterator over padded batches with `_mask`) for one pass over `split`,
  with the fields of `features` (a spec that explodes gives one row per element), then
  `encode(batch, False, stats)` if given."""
  features = _default(features, inp)
  paths = features_lib.exploding(features)
  builder = sources.open_source(inp.data, data_dir)
  sub, _ = _host_split(builder, split, host)
  raw = _raw(builder, sub, inp.image_key)
  if paths:
    raw = raw.flat_map(_explode(paths))
  # Rows per process (elements, when a spec explodes examples) decide how many padded batches all run.
  counts = [int(_raw(builder, s, inp.image_key).flat_map(_explode(paths)).reduce(0, lambda c, _: c + 1))
            if paths else builder.info.splits[s].num_examples
            for s in tfds.even_splits(split, n=host.count)]
  n, num_batches = counts[host.index], -(-max(counts) // local_batch)

  def process(ex):
    if "_x0" in ex:
      ex = _put_back(dict(ex), paths)
    image = preprocess.eval_image(ex[inp.image_key], inp.image_size, inp.mean, inp.std)
    out = _select(ex, features, image, inp.max_text_bytes)
    out["_mask"] = tf.constant(1, tf.int32)
    return out

  ds = raw.map(process, num_parallel_calls=tf.data.AUTOTUNE)
  pad = ds.take(1).map(lambda ex: {**ex, "_mask": tf.constant(0, tf.int32)}).repeat(num_batches * local_batch - n)
  ds = ds.concatenate(pad).batch(local_batch).prefetch(inp.prefetch)
  if encode is None:
    return num_batches, ds.as_numpy_iterator()
  stats = TextStats(warned=True)  # evaluation texts are not counted
  return num_batches, (encode(b, False, stats) for b in ds.as_numpy_iterator())


def _default(features, inp) -> tuple:
  return (features_lib.Label(inp.label_key),) if features is None else tuple(features)
