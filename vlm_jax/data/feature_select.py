"""The TensorFlow side of the feature specs (`data/features.py`): one example's fields as tensors.

`select(spec, ex, seed, max_text_bytes)` returns the batch fields `spec` names; `seed` is the
example's stateless seed when training and None when evaluating. Each spec type draws its random
choices from its own offset of the seed, so adding a spec to a task leaves the others' draws alone.
"""

import tensorflow as tf

from vlm_jax.data import features
from vlm_jax.errors import UserError

LABEL_DTYPES = (tf.int64, tf.int32)


def get(ex, path: str):
  """The feature at `path` ("a/b" reads ex["a"]["b"]); a missing one is a UserError."""
  for key in path.split("/"):
    if key not in ex:
      raise UserError(f"the dataset has no feature '{path}'. Check the input.*_key settings.")
    ex = ex[key]
  return ex


def text_bytes(text, max_text_bytes: int):
  return tf.io.decode_raw(text, tf.uint8, fixed_length=max_text_bytes)


def _index(values, seed):
  """A random index into the first axis of `values` drawn with `seed`."""
  return tf.random.stateless_uniform([], seed=seed, maxval=tf.shape(values)[0], dtype=tf.int32)


def _row(first, second, seed, offset: int):
  """One random row (drawn with `seed + offset`) of two parallel features when they hold several,
  as in training; evaluation rows are exploded to single elements already."""
  if not first.shape.rank:
    return first, second
  i = _index(first, seed + offset)
  return first[i], second[i]


def _label(spec: features.Label, ex, seed, max_text_bytes) -> dict:
  if spec.key in ex and ex[spec.key].dtype in LABEL_DTYPES and ex[spec.key].shape.rank == 0:
    return {spec.name: tf.cast(ex[spec.key], tf.int32)}
  return {}


def _texts(spec: features.Texts, ex, seed, max_text_bytes) -> dict:
  values = get(ex, spec.key)
  if values.shape.rank:
    values = (tf.strings.reduce_join(values, separator="\n") if seed is None
              else values[_index(values, seed + 2)])
  return {spec.name: text_bytes(values, max_text_bytes)}


def _text_pairs(spec: features.TextPairs, ex, seed, max_text_bytes) -> dict:
  q, a = _row(get(ex, spec.q_key), get(ex, spec.a_key), seed, 3)
  return {spec.names[0]: text_bytes(q, max_text_bytes), spec.names[1]: text_bytes(a, max_text_bytes)}


def _objects(spec: features.Objects, ex, seed, max_text_bytes) -> dict:
  boxes = tf.reshape(tf.cast(get(ex, spec.boxes_key), tf.float32), [-1, 4])
  labels = tf.cast(get(ex, spec.labels_key), tf.int32)
  if seed is not None:
    order = tf.argsort(tf.random.stateless_uniform(tf.shape(labels), seed=seed + 4))
    boxes, labels = tf.gather(boxes, order), tf.gather(labels, order)
  boxes, labels = boxes[:spec.max_objects], labels[:spec.max_objects]
  count = tf.shape(labels)[0]
  pad = spec.max_objects - count
  return {f"{spec.name}_boxes": tf.ensure_shape(tf.pad(boxes, [[0, pad], [0, 0]]), [spec.max_objects, 4]),
          f"{spec.name}_labels": tf.ensure_shape(tf.pad(labels, [[0, pad]]), [spec.max_objects]),
          f"{spec.name}_count": count}


def _refs(spec: features.Refs, ex, seed, max_text_bytes) -> dict:
  expr, box = _row(get(ex, spec.expr_key), tf.cast(get(ex, spec.box_key), tf.float32), seed, 5)
  return {spec.name: text_bytes(expr, max_text_bytes), f"{spec.name}_box": tf.ensure_shape(box, [4])}


SELECTORS = {features.Label: _label, features.Texts: _texts, features.TextPairs: _text_pairs,
             features.Objects: _objects, features.Refs: _refs}


def select(spec, ex, seed, max_text_bytes: int) -> dict:
  if type(spec) not in SELECTORS:
    raise TypeError(f"{type(spec).__name__} is not a feature spec of data/features.py.")
  return SELECTORS[type(spec)](spec, ex, seed, max_text_bytes)
