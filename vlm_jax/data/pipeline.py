"""tf.data pipelines that yield numpy batches of this process's share of the global batch.

Train order is a pure function of (seed, step): each process reads its own even split of the
train split; epoch `e` is that split shuffled with seed (seed, e); example augmentation uses
stateless ops seeded by (seed, epoch, example index). Resuming at step `s` therefore skips
s * local_batch raw (undecoded) records and continues with exactly the batches an
uninterrupted run would have seen; no iterator state needs to be checkpointed.

Evaluation reads each split once in order, padded to whole batches with `_mask == 0` rows so
that every process runs the same number of steps.
"""

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vlm_jax.data import preprocess, sources
from vlm_jax.errors import UserError

# Keep TensorFlow off accelerators: JAX owns them.
tf.config.set_visible_devices([], "GPU")

LABEL_DTYPES = (tf.int64, tf.int32)


@dataclasses.dataclass
class Host:
  index: int = 0
  count: int = 1


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


def _select(ex, inp, image):
  out = {"image": image}
  if inp.label_key in ex and ex[inp.label_key].dtype in LABEL_DTYPES and ex[inp.label_key].shape.rank == 0:
    out["label"] = tf.cast(ex[inp.label_key], tf.int32)
  return out


def train_batches(inp, data_dir: str, seed: int, local_batch: int, start_step: int = 0,
                  host: Host = Host()) -> Iterator[dict]:
  """Infinite iterator of training batches starting at `start_step`."""
  builder = sources.open_source(inp.data, data_dir)
  split, n = _host_split(builder, inp.train_split, host)
  raw = _raw(builder, split, inp.image_key).enumerate()
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
    return _select(ex, inp, img)

  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(inp.prefetch)
  return ds.as_numpy_iterator()


def eval_batches(inp, data_dir: str, split: str, local_batch: int, host: Host = Host()):
  """Returns (num_batches, iterator over padded batches with `_mask`) for one pass over `split`."""
  builder = sources.open_source(inp.data, data_dir)
  sub, n = _host_split(builder, split, host)
  largest = max(builder.info.splits[s].num_examples for s in tfds.even_splits(split, n=host.count))
  num_batches = -(-largest // local_batch)

  def process(ex):
    out = _select(ex, inp, preprocess.eval_image(ex[inp.image_key], inp.image_size, inp.mean, inp.std))
    out["_mask"] = tf.constant(1, tf.int32)
    return out

  ds = _raw(builder, sub, inp.image_key).map(process, num_parallel_calls=tf.data.AUTOTUNE)
  pad = ds.take(1).map(lambda ex: {**ex, "_mask": tf.constant(0, tf.int32)}).repeat(num_batches * local_batch - n)
  ds = ds.concatenate(pad).batch(local_batch).prefetch(inp.prefetch)
  return num_batches, ds.as_numpy_iterator()
