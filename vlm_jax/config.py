"""Config loading, defaults and validation for ml_collections recipes.

Every recipe starts from `base_config()`, which holds the keys common to all tasks (see the
README's config table), and fills in `task`, `model`, `input` and `evals`. The config is locked
before command-line overrides are applied, so a mistyped key is an error with a suggestion
rather than a silently ignored value. `validate` checks what the type system cannot (mesh
spec, batch divisibility, value ranges) and raises `UserError` naming the key and the fix.
"""

import difflib
import importlib.util
import json
import os
import re

import ml_collections
from absl import flags

from vlm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
NAN_POLICIES = ("skip", "stop")
REQUIRED = ("task", "total_steps", "batch_size", "model", "input", "optimizer")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""  # a key of vlm_jax.tasks.TASKS
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64  # global, over all hosts and devices
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.grad_accum_steps = 1  # microbatches per step (lax.scan inside the jitted step); batch_size stays global
  c.peak_tflops = 0.0  # per-device peak for MFU; 0: bf16 table for TPU/GPU, measured matmul peak on CPU
  c.nan_policy = "skip"  # non-finite loss or gradient norm: "skip" the update, or "stop" the run
  c.data_dir = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  c.mesh = "data=-1,fsdp=1,tensor=1"
  c.init_from = ""  # another workdir (or workdir:STEP) whose params initialise this run
  c.init_include = ".*"  # regex: which parameters init_from loads (e.g. '^encoder/')
  c.init_prefix = ""  # put the source's params under this path, e.g. 'img/': a classifier's ViT -> captioner
  c.distributed = ml_collections.ConfigDict(
      dict(enable="auto", coordinator_address="", num_processes=0, process_id=-1))

  c.model = ml_collections.ConfigDict()

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-3, warmup_steps=100, schedule="cosine",
      end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
      grad_clip_norm=1.0,
      # Parameters whose path matches this regex get no weight decay.
      no_decay="(bias|scale|pos_embedding|cls|embedding)$",
      # Fine-tuning: a regex of parameters to keep fixed (no updates, no optimizer state), e.g. '^img/'.
      freeze="",
      # Learning-rate multipliers by parameter group: 'REGEX=MULT;REGEX=MULT' (first match wins).
      lr_multipliers="",
      # Layer-wise lr decay (0: off): layer i of L gets decay**(L - i), embeddings decay**(L + 1).
      layer_decay=0.0,
      layer_decay_scope="",  # regex holding exactly one layer stack, e.g. '^img/' for a captioner
      layer_decay_embed="(^|/)(embedding|pos_embedding|cls)(/|$)"))

  c.input = ml_collections.ConfigDict(dict(
      data="shapes",  # tfds name[/config], e.g. shapes, shapes/tiny, cifar10, imagenet2012
      train_split="train",
      image_key="image",
      label_key="label",
      image_size=64,
      shuffle_buffer_size=50_000,
      # Keep this process's decoded train images in memory after the first epoch (uint8, H*W*3
      # bytes each: for small datasets such as shapes, where decoding competes with the step).
      cache_decoded=False,
      random_crop_scale=(1.0, 1.0),  # (min, max) area fraction of an Inception-style crop
      flip=False,
      mean=(0.5, 0.5, 0.5),
      std=(0.5, 0.5, 0.5),
      prefetch=2,
      # The texts a task reads: "" (none) or a mode its `Task.validate` accepts.
      text="",
      caption_key="caption",  # a string or a list of strings (several references), e.g. captions/text
      question_key="qa/question",
      answer_key="qa/answer",
      max_len=32,  # tokens per sequence, BOS and EOS included
      max_text_bytes=512,  # raw UTF-8 bytes kept per text field before tokenisation
      tokenizer="",  # path of a tokenizer.json; empty: trained on the train split and cached
      vocab_size=1000))

  c.evals = ml_collections.ConfigDict(dict(
      splits="validation,test",
      batch_size=256,
      pictures=16,  # example predictions drawn per evaluation; 0 disables
      decode="greedy",  # text tasks: greedy, beam or sample
      beam_size=4,
      decode_len=0))  # tokens generated per example; 0: input.max_len - 1
  return c


def recipe_module(path: str):
  """The recipe file at `path` as a module (recipes build on each other through it)."""
  if not os.path.exists(path):
    raise UserError(f"config file '{path}' does not exist.")
  mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads a recipe 'path/to/recipe.py[:ARG]' the way --config does (for tests and tools)."""
  path, _, arg = spec.partition(":")
  module = recipe_module(path)
  cfg = module.get_config(arg) if arg else module.get_config()
  cfg.lock()
  return cfg


# Model settings that no longer exist, as recorded in older workdirs' config.json: `matmul` picked
# CPU matmul kernels, and attention "cpu_fused" a CPU attention kernel ("auto" now).
RETIRED_MODEL_KEYS = ("matmul",)
RETIRED_ATTENTION = {"cpu_fused": "auto"}


def from_json(text: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to WORKDIR/config.json. Keys added to `base_config` since
  that run take their defaults and retired model settings are dropped (`_drop_retired`), so
  workdirs of older versions still evaluate, export and resume."""
  d = json.loads(text)
  if isinstance(d.get("model"), dict):
    _drop_retired(d["model"])
  for key in ("random_crop_scale", "mean", "std"):
    if key in d.get("input", {}):
      d["input"][key] = tuple(d["input"][key])
  _fill_missing(d, base_config().to_dict())
  cfg = ml_collections.ConfigDict(d)
  cfg.lock()
  return cfg


def _drop_retired(model: dict) -> None:
  """Removes RETIRED_MODEL_KEYS and maps RETIRED_ATTENTION, in `model` and its sub-dicts (towers)."""
  for key in RETIRED_MODEL_KEYS:
    model.pop(key, None)
  if model.get("attention") in RETIRED_ATTENTION:
    model["attention"] = RETIRED_ATTENTION[model["attention"]]
  for v in model.values():
    if isinstance(v, dict):
      _drop_retired(v)


def _retired_in(model, path="model") -> str:
  """The first retired setting under `model` (a ConfigDict), as 'model.a.b=value', or ''."""
  for key, v in model.items():
    if key in RETIRED_MODEL_KEYS or (key == "attention" and v in RETIRED_ATTENTION):
      return f"{path}.{key}={v!r}"
    if isinstance(v, ml_collections.ConfigDict) and (found := _retired_in(v, f"{path}.{key}")):
      return found
  return ""


def _fill_missing(d: dict, defaults: dict) -> None:
  for k, v in defaults.items():
    if k not in d:
      d[k] = v
    elif isinstance(v, dict) and isinstance(d[k], dict):
      _fill_missing(d[k], v)


def nearest(name: str, options) -> str:
  match = difflib.get_close_matches(name, list(options), n=1)
  return f" Did you mean '{match[0]}'?" if match else ""


def parse_mesh(spec: str) -> dict:
  """'data=-1,fsdp=2,tensor=1' -> {'data': -1, 'fsdp': 2, 'tensor': 1} (missing axes are 1)."""
  out = {a: 1 for a in MESH_AXES}
  for part in filter(None, (p.strip() for p in str(spec).split(","))):
    if "=" not in part:
      raise UserError(f"mesh: '{part}' is not AXIS=SIZE; write e.g. --config.mesh=data=-1,fsdp=1,tensor=1")
    name, size = (s.strip() for s in part.split("=", 1))
    if name not in MESH_AXES:
      raise UserError(f"mesh: unknown axis '{name}'.{nearest(name, MESH_AXES)} Axes are {', '.join(MESH_AXES)}.")
    try:
      out[name] = int(size)
    except ValueError:
      raise UserError(f"mesh: size of '{name}' must be an integer (or -1 for all remaining devices), got '{size}'.") from None
  if sum(v == -1 for v in out.values()) > 1:
    raise UserError("mesh: at most one axis may be -1.")
  if any(v == 0 or v < -1 for v in out.values()):
    raise UserError(f"mesh: sizes must be positive or -1, got {spec}.")
  return out


DECODERS = ("greedy", "beam", "sample")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises UserError for a config that cannot run (independent of the devices present and of the
  task: `tasks.validate` refuses an unknown task name and checks the task's own keys)."""
  for key in REQUIRED:
    if key not in cfg or cfg[key] in ("", None):
      raise UserError(f"config: required key '{key}' is missing or empty; set it in the recipe or with --config.{key}=...")
  for key in ("total_steps", "batch_size", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
              "keep_checkpoints"):
    if not isinstance(cfg[key], int) or cfg[key] <= 0:
      raise UserError(f"config: '{key}' must be a positive integer, got {cfg[key]!r}.")
  accum = cfg.get("grad_accum_steps", 1)  # absent from configs written before it existed
  if not isinstance(accum, int) or accum <= 0:
    raise UserError(f"config: 'grad_accum_steps' must be a positive integer, got {accum!r}.")
  if cfg.get("nan_policy") not in NAN_POLICIES:
    raise UserError(f"config: nan_policy must be one of {', '.join(NAN_POLICIES)}, got {cfg.get('nan_policy')!r}.")
  parse_mesh(cfg.mesh)
  if retired := _retired_in(cfg.model):
    raise UserError(f"config: {retired} is a retired setting (it chose CPU kernels, which no longer exist); "
                    f"delete it from the recipe (attention: use 'auto', 'xla' or 'cudnn').")
  for group, key in (("input", "image_size"), ("evals", "batch_size")):
    value = cfg[group].get(key)
    if not isinstance(value, int) or value <= 0:
      raise UserError(f"config: '{group}.{key}' must be a positive integer, got {value!r}.")
  inp = cfg.input
  for key in ("mean", "std"):
    v = inp.get(key)
    if not isinstance(v, (tuple, list)) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
      raise UserError(f"config: 'input.{key}' must be 3 numbers (one per RGB channel), got {v!r}; "
                      f"e.g. --config.input.{key}='(0.5,0.5,0.5)'.")
  if any(x == 0 for x in inp.std):
    raise UserError(f"config: 'input.std' must not contain 0, got {inp.std!r}.")
  scale = inp.get("random_crop_scale", (1.0, 1.0))
  if (not isinstance(scale, (tuple, list)) or len(scale) != 2 or not all(isinstance(x, (int, float)) for x in scale)
      or not 0 < scale[0] <= scale[1] <= 1):
    raise UserError(f"config: 'input.random_crop_scale' must be (min, max) area fractions with "
                    f"0 < min <= max <= 1, got {scale!r}; e.g. --config.input.random_crop_scale='(0.08,1.0)'.")
  ev = cfg.evals
  checks = (("input.max_len", inp.get("max_len", 2), 2, "BOS and EOS take 2 positions"),
            ("evals.decode_len", ev.get("decode_len", 0), 0, "0 means input.max_len - 1"),
            ("evals.beam_size", ev.get("beam_size", 1), 1, "the beams kept per example"))
  for key, value, least, meaning in checks:
    if not isinstance(value, int) or value < least:
      raise UserError(f"config: '{key}' must be an integer >= {least} ({meaning}), got {value!r}.")
  if ev.get("decode", "greedy") not in DECODERS:
    raise UserError(f"config: evals.decode='{ev.decode}' is unknown; use {', '.join(DECODERS)}.")


def parse_argv(flag_values, argv) -> None:
  """Parses command-line flags; config mistakes (unknown key, wrong type, bad file) become UserError."""
  try:
    flag_values(argv)
    if "config" in flag_values and flag_values.config is not None:
      flag_values.config.get  # noqa: B018  (a recipe file that failed to load raises only when read)
  except flags.Error as e:
    text = str(e)
    if "Traceback" in text:  # an exception inside the recipe file: keep its last line
      text = "config: the recipe raised " + text.strip().splitlines()[-1].strip()
    elif m := re.match(r"flag (--config\.\S+?)=(.*?): (.*)", text, re.S):
      text = (f"config: {m.group(1)}={m.group(2)} has the wrong type ({m.group(3).strip()}). "
              f"Give a value of the key's type; see the recipe or the README's config keys.")
    elif m := re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", text):
      text = f"missing required flag --{m.group(1)}; pass --{m.group(1)}=... (see --help)."
    raise UserError(" ".join(text.split())) from None
  except OSError as e:  # the recipe file is missing or unreadable
    raise UserError(f"config: cannot load the recipe file: {str(e).strip().splitlines()[-1].strip()}. "
                    f"Pass --config path/to/recipe.py[:ARG], e.g. --config configs/vit_shapes.py.") from None
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    text = str(e.args[0] if e.args else e)
    m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    # The override naming the key the error is about (a KeyError holds the bare key), else the first.
    named = [a for a in overrides if any(f"'{part}'" in text or f'"{part}"' in text
                                         for part in a[len("--config."):].split("."))]
    bad = (named or overrides or ["--config"])[0]
    if m:
      raise UserError(f"config: unknown key '{m.group(2)}' in {bad}. Did you mean '{m.group(1)}'?") from None
    raise UserError(f"config: invalid override {bad}: {' '.join(text.split())}. Keys of every recipe are "
                    f"listed in the README; run with --debug for the full traceback.") from None


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
