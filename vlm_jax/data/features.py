"""Feature specs: the dataset fields a task reads, in data-layer terms (no task, no model).

A task lists specs (`Task.features`); the pipeline turns each example into the batch fields the
specs name. Every spec reads feature paths ("qa/question": a key inside a nested feature);
`data/feature_select.py` turns a spec into its fields as tensors (this module imports no
TensorFlow, so tasks and the tools that build models do not either). Texts travel as fixed-length
UTF-8 byte arrays (uint8, `max_text_bytes`) so that every field is numeric. A spec whose `explodes` names
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


@dataclasses.dataclass(frozen=True)
class Label:
  key: str
  name: str = "label"
  explodes = ()


@dataclasses.dataclass(frozen=True)
class Texts:
  key: str
  name: str = "caption"
  explodes = ()


@dataclasses.dataclass(frozen=True)
class TextPairs:
  q_key: str
  a_key: str
  names: tuple = ("question", "answer")

  @property
  def explodes(self):
    return (self.q_key, self.a_key)


@dataclasses.dataclass(frozen=True)
class Objects:
  boxes_key: str
  labels_key: str
  max_objects: int
  name: str = "objects"
  explodes = ()


@dataclasses.dataclass(frozen=True)
class Refs:
  expr_key: str
  box_key: str
  name: str = "ref"

  @property
  def explodes(self):
    return (self.expr_key, self.box_key)


def exploding(features) -> tuple:
  """The feature paths evaluation explodes into rows (at most one spec may explode)."""
  paths = [s.explodes for s in features if s.explodes]
  if len(paths) > 1:
    raise ValueError(f"a task may read at most one feature evaluated one row per element; got {paths}.")
  return paths[0] if paths else ()
