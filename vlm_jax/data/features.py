"""Feature specs: the dataset fields a task reads, in data-layer terms (no task, no model).

A task lists specs (`Task.features`); the pipeline turns each example into the batch fields the
specs name. Every spec reads feature paths ("qa/question": a key inside a nested feature) and
`select(ex, seed, max_text_bytes)` returns its fields as tensors: `seed` is the example's
stateless seed when training and None when evaluating. Texts travel as fixed-length UTF-8 byte
arrays (uint8, `max_text_bytes`) so that every field is numeric. A spec whose `explodes` names
paths turns one evaluation example into one row per element of those (rank-1) features.

  Label(key)                    `label` int32, only where `key` is a scalar integer feature
  Texts(key)                    `caption`: train one random text of several, eval all joined by "\\n"
  TextPairs(q_key, a_key)       `question`, `answer`: train one random pair, eval one row per pair
  Objects(boxes_key, labels_key, max_objects)
                                `objects_boxes` [N, 4] float32 (y1, x1, y2, x2, normalised),
                                `objects_labels` [N] int32, `objects_count` int32; N = max_objects,
                                zero-padded (objects past N are left out); train: the order is
                                shuffled per example with its seed, eval: the dataset's order
  Refs(expr_key, box_key)       `ref` (text), `ref_box` [4] float32: train one random referring
                                expression, eval one row per expression
"""

import dataclasses

import tensorflow as tf

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


@dataclasses.dataclass(frozen=True)
class Label:
  key: str
  name: str = "label"
  explodes = ()

  def select(self, ex, seed, max_text_bytes) -> dict:
    if self.key in ex and ex[self.key].dtype in LABEL_DTYPES and ex[self.key].shape.rank == 0:
      return {self.name: tf.cast(ex[self.key], tf.int32)}
    return {}


@dataclasses.dataclass(frozen=True)
class Texts:
  key: str
  name: str = "caption"
  explodes = ()

  def select(self, ex, seed, max_text_bytes) -> dict:
    values = get(ex, self.key)
    if values.shape.rank:
      values = (tf.strings.reduce_join(values, separator="\n") if seed is None
                else values[_index(values, seed + 2)])
    return {self.name: text_bytes(values, max_text_bytes)}


@dataclasses.dataclass(frozen=True)
class TextPairs:
  q_key: str
  a_key: str
  names: tuple = ("question", "answer")

  @property
  def explodes(self):
    return (self.q_key, self.a_key)

  def select(self, ex, seed, max_text_bytes) -> dict:
    q, a = _row(get(ex, self.q_key), get(ex, self.a_key), seed, 3)
    return {self.names[0]: text_bytes(q, max_text_bytes), self.names[1]: text_bytes(a, max_text_bytes)}


@dataclasses.dataclass(frozen=True)
class Objects:
  boxes_key: str
  labels_key: str
  max_objects: int
  name: str = "objects"
  explodes = ()

  def select(self, ex, seed, max_text_bytes) -> dict:
    boxes = tf.reshape(tf.cast(get(ex, self.boxes_key), tf.float32), [-1, 4])
    labels = tf.cast(get(ex, self.labels_key), tf.int32)
    if seed is not None:
      order = tf.argsort(tf.random.stateless_uniform(tf.shape(labels), seed=seed + 4))
      boxes, labels = tf.gather(boxes, order), tf.gather(labels, order)
    boxes, labels = boxes[:self.max_objects], labels[:self.max_objects]
    count = tf.shape(labels)[0]
    pad = self.max_objects - count
    return {f"{self.name}_boxes": tf.ensure_shape(tf.pad(boxes, [[0, pad], [0, 0]]), [self.max_objects, 4]),
            f"{self.name}_labels": tf.ensure_shape(tf.pad(labels, [[0, pad]]), [self.max_objects]),
            f"{self.name}_count": count}


@dataclasses.dataclass(frozen=True)
class Refs:
  expr_key: str
  box_key: str
  name: str = "ref"

  @property
  def explodes(self):
    return (self.expr_key, self.box_key)

  def select(self, ex, seed, max_text_bytes) -> dict:
    expr, box = _row(get(ex, self.expr_key), tf.cast(get(ex, self.box_key), tf.float32), seed, 5)
    return {self.name: text_bytes(expr, max_text_bytes), f"{self.name}_box": tf.ensure_shape(box, [4])}


def exploding(features) -> tuple:
  """The feature paths evaluation explodes into rows (at most one spec may explode)."""
  paths = [s.explodes for s in features if s.explodes]
  if len(paths) > 1:
    raise ValueError(f"a task may read at most one feature evaluated one row per element; got {paths}.")
  return paths[0] if paths else ()
