"""Scenes of the embedded `shapes` dataset: sampling, rendering, caption, QA, referring expressions.

Pure numpy + PIL (no tensorflow, no jax), so it runs and is tested on its own;
`shapes.py` only wraps it in a tfds builder. Everything an example holds is a
function of one `np.random.Generator` seeded from (SEED, split_id, index), and
the rng is consumed in a fixed order: scene, questions, then pixels (referring expressions
are a function of the scene and draw nothing). So
`sample_scene(example_rng(s, i))` alone gives the scene (and caption) of
example i without rendering it, and only the pixels depend on the image size.

A scene is a tuple of `Obj`: the one large object first, then 0-2 small ones
from left to right. Coordinates are fractions of the image side, so the same
index gives the same layout at every image size.
"""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

SEED = 1_234_567
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
LABEL_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
_RGB = np.array([
    (215, 35, 35),     # red
    (40, 185, 60),     # green
    (45, 95, 235),     # blue
    (235, 215, 40),    # yellow
    (155, 50, 205),    # purple
    (235, 235, 235),   # white
], dtype=np.float32)

# Row-major 3x3 grid of the large object's centre.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
_POSITION_PHRASES = (
    "in the top left", "at the top", "in the top right",
    "on the left", "at the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right")
RELATIONS = ("left", "right", "above", "below")
_RELATION_PHRASES = ("to its left", "to its right", "above it", "below it")
# Fixed per shape (not random) so a caption is a function of the scene.
_LARGE_WORD = {"circle": "large", "square": "large",
               "triangle": "big", "diamond": "big"}
NUMBER_WORDS = ("zero", "one", "two", "three")

# Mostly 3 objects: one-object scenes have only 216 possible captions, so
# they dominate the caption duplicate rate.
NUM_OBJECTS_PROBS = (0.05, 0.20, 0.75)  # P(1), P(2), P(3) objects
LARGE_SIDE = (0.40, 0.50)
SMALL_SIDE = (0.18, 0.25)
# The large centre keeps this distance from the 1/3 and 2/3 grid lines, and
# small objects are placed clearly off the diagonals of the large one, so the
# position and relation words are visually unambiguous.
_CELL_MARGIN = 0.03
_AXIS_RATIO = 1.5
_MAX_SMALL_OVERLAP = 0.1  # of the small box's area, against the large box
_MIN_SMALL_DX = 0.08      # keeps "left to right" order of small ones visible
_SUPERSAMPLE = 4          # shapes are drawn at 4x and box-filtered (smooth edges)


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: int   # index into SHAPES
  color: int   # index into COLORS
  large: bool
  cx: float    # centre and side, as fractions of the image side
  cy: float
  side: float

  @property
  def box(self):
    """(x0, y0, x1, y1) in [0, 1]."""
    h = self.side / 2
    return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

  @property
  def name(self):
    return f"{COLORS[self.color]} {SHAPES[self.shape]}"


def example_rng(split_id, index):
  return np.random.default_rng([SEED, split_id, index])


def label_of(scene):
  large = scene[0]
  return large.color * len(SHAPES) + large.shape


def grid_cell(obj):
  """Index into POSITIONS of the object's centre."""
  col = min(int(obj.cx * 3), 2)
  row = min(int(obj.cy * 3), 2)
  return 3 * row + col


def relation(small, large):
  """Index into RELATIONS of `small` seen from `large` (dominant axis)."""
  dx, dy = small.cx - large.cx, small.cy - large.cy
  if abs(dx) >= abs(dy):
    return 0 if dx < 0 else 1
  return 2 if dy < 0 else 3


def _overlap(a, b):
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return max(w, 0.0) * max(h, 0.0)


def _sample_large(rng):
  side = rng.uniform(*LARGE_SIDE)
  half, m = side / 2, _CELL_MARGIN
  ranges = ((half, 1 / 3 - m), (1 / 3 + m, 2 / 3 - m), (2 / 3 + m, 1 - half))
  row, col = rng.integers(3), rng.integers(3)
  return Obj(shape=int(rng.integers(len(SHAPES))),
             color=int(rng.integers(len(COLORS))), large=True,
             cx=rng.uniform(*ranges[col]), cy=rng.uniform(*ranges[row]),
             side=side)


def _small_ok(obj, large, smalls):
  box = obj.box
  if _overlap(box, large.box) > _MAX_SMALL_OVERLAP * obj.side ** 2:
    return False
  dx, dy = abs(obj.cx - large.cx), abs(obj.cy - large.cy)
  if max(dx, dy) < _AXIS_RATIO * min(dx, dy):
    return False
  return all(_overlap(box, s.box) == 0.0
             and abs(obj.cx - s.cx) >= _MIN_SMALL_DX for s in smalls)


def sample_scene(rng):
  """Samples the objects of a scene: large first, then small left to right."""
  num_objects = 1 + int(rng.choice(3, p=NUM_OBJECTS_PROBS))
  while True:  # a full retry is rare (a large object leaving no room)
    large = _sample_large(rng)
    smalls = []
    for _ in range(200):
      if len(smalls) == num_objects - 1:
        break
      side = rng.uniform(*SMALL_SIDE)
      obj = Obj(shape=int(rng.integers(len(SHAPES))),
                color=int(rng.integers(len(COLORS))), large=False,
                cx=rng.uniform(side / 2, 1 - side / 2),
                cy=rng.uniform(side / 2, 1 - side / 2), side=side)
      if _small_ok(obj, large, smalls):
        smalls.append(obj)
    if len(smalls) == num_objects - 1:
      return (large, *sorted(smalls, key=lambda o: o.cx))


def _background(rng, n):
  """Low-contrast dark grey gradient with a slight tint and pixel noise."""
  base = rng.uniform(40.0, 80.0)
  contrast = rng.uniform(-30.0, 30.0)
  angle = rng.uniform(0.0, 2 * np.pi)
  tint = rng.uniform(-8.0, 8.0, size=3).astype(np.float32)
  t = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
  ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
  img = (base + contrast * ramp)[:, :, None] + tint
  return img + rng.normal(0.0, 6.0, size=(n, n, 3)).astype(np.float32)


def _coverage(obj, n):
  """Pixel window (x0, y0, x1, y1) around the object and the fraction of each
  of its pixels that the shape covers, shape (y1 - y0, x1 - x0, 1)."""
  ss = _SUPERSAMPLE
  bx0, by0, bx1, by1 = (v * n for v in obj.box)
  wx0, wy0 = int(np.floor(bx0)), int(np.floor(by0))
  wx1, wy1 = min(int(np.ceil(bx1)), n), min(int(np.ceil(by1)), n)
  # Box corners in supersampled window coordinates.
  x0, y0 = (bx0 - wx0) * ss, (by0 - wy0) * ss
  x1, y1 = (bx1 - wx0) * ss, (by1 - wy0) * ss
  xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
  w, h = wx1 - wx0, wy1 - wy0
  mask = Image.new("L", (w * ss, h * ss), 0)
  draw = ImageDraw.Draw(mask)
  shape = SHAPES[obj.shape]
  if shape == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=255)
  elif shape == "square":
    draw.rectangle((x0, y0, x1, y1), fill=255)
  elif shape == "triangle":
    draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=255)
  else:
    draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=255)
  mask = mask.resize((w, h), Image.Resampling.BOX)
  cover = np.asarray(mask, dtype=np.float32)[:, :, None] / 255.0
  return (wx0, wy0, wx1, wy1), cover


def render(scene, image_size, rng):
  """Draws the scene (large object first) into an RGB uint8 array."""
  img = _background(rng, image_size)
  for obj in scene:
    color = _RGB[obj.color] + rng.uniform(-12.0, 12.0, size=3)
    (x0, y0, x1, y1), alpha = _coverage(obj, image_size)
    win = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = win * (1.0 - alpha) + color * alpha
  img = img + rng.normal(0.0, 3.0, size=img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_png(image):
  """PNG bytes of an RGB uint8 array (PIL is ~4x faster than tfds' encoder)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="png")
  return buf.getvalue()


def caption(scene):
  """English description; the words depend only on the scene's content."""
  large = scene[0]
  shape = SHAPES[large.shape]
  text = (f"a {_LARGE_WORD[shape]} {COLORS[large.color]} {shape} "
          f"{_POSITION_PHRASES[grid_cell(large)]}")
  smalls = [f"a small {o.name} {_RELATION_PHRASES[relation(o, large)]}"
            for o in scene[1:]]
  if len(smalls) == 1:
    return f"{text} with {smalls[0]}"
  if len(smalls) == 2:
    return f"{text}, {smalls[0]} and {smalls[1]}"
  return text


def _unique(scene, key):
  """Objects whose attribute `key(obj)` no other object in the scene shares."""
  values = [key(o) for o in scene]
  return [o for o in scene if values.count(key(o)) == 1]


def _pick(rng, candidates):
  return candidates[int(rng.integers(len(candidates)))]


def _qa_color(scene, rng):
  cands = [("what color is the large shape?", COLORS[scene[0].color])]
  cands += [(f"what color is the {SHAPES[o.shape]}?", COLORS[o.color])
            for o in _unique(scene, lambda o: o.shape)]
  return _pick(rng, cands)


def _qa_shape(scene, rng):
  cands = [("what shape is the large object?", SHAPES[scene[0].shape])]
  cands += [(f"what shape is the {COLORS[o.color]} object?", SHAPES[o.shape])
            for o in _unique(scene, lambda o: o.color)]
  return _pick(rng, cands)


def _qa_count(scene, rng):
  kind = int(rng.integers(3))
  if kind == 0:
    return ("how many objects are there?", NUMBER_WORDS[len(scene)])
  if kind == 1:
    return ("how many small objects are there?", NUMBER_WORDS[len(scene) - 1])
  shape = int(rng.integers(len(SHAPES)))
  count = sum(o.shape == shape for o in scene)
  return (f"how many {SHAPES[shape]}s are there?", NUMBER_WORDS[count])


def _qa_position(scene, rng):
  large = scene[0]
  smalls = [o for o in _unique(scene, lambda o: (o.name, o.large))
            if not o.large]
  if smalls and rng.random() < 0.5:
    o = _pick(rng, smalls)
    return (f"where is the small {o.name} relative to the large shape?",
            RELATIONS[relation(o, large)])
  return ("where is the large shape?", POSITIONS[grid_cell(large)])


def _qa_yesno(scene, rng):
  present = {(o.color, o.shape) for o in scene}
  if rng.random() < 0.5:
    o = _pick(rng, scene)
    return (f"is there a {o.name}?", "yes")
  absent = [(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))
            if (c, s) not in present]
  c, s = _pick(rng, absent)
  return (f"is there a {COLORS[c]} {SHAPES[s]}?", "no")


QA_TYPES = ("color", "shape", "count", "position", "yesno")
_QA_FNS = (_qa_color, _qa_shape, _qa_count, _qa_position, _qa_yesno)


def sample_qa(scene, rng, num=4):
  """`num` (question, answer) pairs of distinct types, in random order."""
  types = rng.choice(len(QA_TYPES), size=num, replace=False)
  return [_QA_FNS[t](scene, rng) for t in types]


# Attribute sets of a referring expression, fewest words first ("the circle", "the red circle",
# "the small circle", "the small red circle"); the noun is always the shape.
_REF_ATTRS = ((), ("color",), ("size",), ("size", "color"))
REF_SIDES = ("left", "right")


def _ref_phrase(obj, attrs):
  words = ["the"]
  if "size" in attrs:
    words.append(SIZES[int(obj.large)])
  if "color" in attrs:
    words.append(COLORS[obj.color])
  return " ".join(words + [SHAPES[obj.shape]])


def _describe(scene, index):
  """The shortest expression that picks out scene[index] alone, or None."""
  obj = scene[index]
  for attrs in _REF_ATTRS:
    if [_ref_phrase(o, attrs) for o in scene].count(_ref_phrase(obj, attrs)) == 1:
      return _ref_phrase(obj, attrs)
  # Objects that share every attribute (two identical small ones) are told apart by side, when
  # exactly two objects fit the description and they are clearly apart horizontally.
  for attrs in _REF_ATTRS:
    same = sorted((o.cx, i) for i, o in enumerate(scene)
                  if _ref_phrase(o, attrs) == _ref_phrase(obj, attrs))
    if len(same) == 2 and same[1][0] - same[0][0] >= _MIN_SMALL_DX:
      side = REF_SIDES[[i for _, i in same].index(index)]
      return f"{_ref_phrase(obj, attrs)} on the {side}"
  return None


def referring_expressions(scene):
  """(object index, expression) for each object that one description picks out alone.

  The expression is the shortest of "the [small|large] [colour] shape" that no other object of
  the scene fits (fewest words; colour before size at equal length), e.g. "the circle", "the red
  square", "the large diamond"; objects identical in all three (two small ones) get "... on the
  left" / "... on the right" of the two. In this generator every object gets one: identical
  objects are always two small ones at least _MIN_SMALL_DX apart.
  """
  refs = [(i, _describe(scene, i)) for i in range(len(scene))]
  return [(i, e) for i, e in refs if e is not None]


def make_example(split_id, index, image_size=64, num_qa=4):
  """Example `index` of split `split_id` as plain numpy / python values."""
  rng = example_rng(split_id, index)
  scene = sample_scene(rng)
  qa = sample_qa(scene, rng, num_qa)
  image = render(scene, image_size, rng)  # last: its draws depend on the size
  # tfds BBox order: ymin, xmin, ymax, xmax.
  boxes = [np.clip(np.array([o.box[1], o.box[0], o.box[3], o.box[2]]), 0.0, 1.0) for o in scene]
  return {
      "image": image,
      "label": label_of(scene),
      "caption": caption(scene),
      "qa": [{"question": q, "answer": a} for q, a in qa],
      "objects": [{
          "bbox": box,
          "shape": o.shape,
          "color": o.color,
          "size": int(o.large),
      } for o, box in zip(scene, boxes)],
      "refs": [{"expression": text, "bbox": boxes[i], "object": i}
               for i, text in referring_expressions(scene)],
  }
