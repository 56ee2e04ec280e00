"""The task interface: everything the trainer, evaluator, pipeline, FLOP counter, exporter and
predict CLI know about a task goes through the members of `Task`.

A task is a subclass of `Task` constructed as `Task(cfg, data_info)` (`data_info`: the dataset's
`sources.DataInfo`, class names included). Members, with the defaults this class provides:

Declarations (class attributes)
  name: str                       the config's `task` value (the key of `tasks.TASKS`)
  collects_predictions = False    evaluation gathers every batch's predictions to the host and
                                  hands them to `collect`
  text_fields = ()                batch fields gathered with the predictions (references)
  prompt_option = None            the predict CLI's text option the task accepts ("question"
                                  gives `--question TEXT`), None: images only
  prompt_help = ""                that option's help text
  hf_family = None                the `vlm_jax.hf` family module that exports the task's runs
                                  (`export(run, out) -> HF class name`); None: not exportable
  needs_classes = False           the model's shape depends on the dataset's class count (the
                                  compile tool then asks for it, having no dataset)

Config
  validate(cfg) (classmethod)     raises UserError for the task's own config keys (e.g. the
                                  `input.text` modes it reads); runs with `config.validate`,
                                  before the dataset is opened
  predict_config(cfg, prompt) (classmethod)
                                  edits the restored config for a predict call given `prompt`
                                  (the `prompt_option` text, "" for none; the CLI refuses a
                                  prompt when `prompt_option` is None); default: unchanged

Data (host side, numpy)
  features(inp) -> tuple          `data.features` specs of the dataset fields read (Label, Texts,
                                  TextPairs, Objects, Refs); `inp` is the config's `input`
  encode(batch, train, stats) -> batch
                                  adds model inputs from the fields (texts -> `tokens`,
                                  `loss_mask`, `prompt`); counts texts into `stats`
                                  (`pipeline.TextStats`); default: the batch unchanged
  tokenizer = None                the run's tokenizer (saved with the workdir, exported), or None
  predict_inputs(images, prompt) -> batch
                                  the predict CLI's batch for [N, H, W, 3] images and the prompt
                                  text ("" for none); default: {"image": images}

Model (inside jit)
  model                           the Flax module
  dummy_batch(n) -> dict          numpy arrays with the shapes and dtypes of one batch (for init)
  eval_dummy_batch(n) -> dict     the same for an evaluation batch (`_mask`, prompts); default:
                                  dummy_batch(n) with `_mask`
  init(rng, batch)                boxed params (logical partitioning metadata kept)
  loss_fn(params, batch, rng) -> (loss, metrics)
  eval_fn(params, batch) -> dict  per-batch sums, masked by batch["_mask"]
  predict_fn(params, batch) -> dict
                                  predictions (evaluator pictures, `collect`, predict CLI)
  flops(example, global_batch) -> (forward FLOPs per example, of which input-side-only) or None
                                  for `example` = dummy_batch(1); one training step costs
                                  3 * forward - input_side (`flops.train_flops`)
  load_pretrained(params) -> (params, copied paths)
                                  weights the task's config names (e.g. a Hugging Face text
                                  tower), loaded before step 1; default: none

Results (host side)
  collect(batch, preds) -> list   records (prediction, references) of the real rows of a
                                  gathered batch, when `collects_predictions`; default: []
  summarize(sums, records) -> dict
                                  metric values named as in the contract
  draw(batch, preds) -> list      (image, text, correct) triples for the example picture
  format(preds, image_sizes) -> list[str]
                                  the printed prediction of each row (predict CLI);
                                  `image_sizes`: each row's original (height, width) in pixels

Adding a task: its module (a `Task` subclass), its metric under `metrics/` if new, its recipes
under `configs/`, and one line in `tasks.TASKS`.
"""

import numpy as np


class Task:
  name = ""
  collects_predictions = False
  text_fields = ()
  prompt_option = None
  prompt_help = ""
  hf_family = None
  needs_classes = False
  tokenizer = None
  model = None

  @classmethod
  def validate(cls, cfg) -> None:
    pass

  @classmethod
  def predict_config(cls, cfg, prompt: str) -> None:
    pass

  def features(self, inp) -> tuple:
    raise NotImplementedError

  def encode(self, batch: dict, train: bool, stats) -> dict:
    return batch

  def predict_inputs(self, images, prompt: str = "") -> dict:
    return {"image": images}

  def dummy_batch(self, n: int) -> dict:
    raise NotImplementedError

  def eval_dummy_batch(self, n: int) -> dict:
    return {**self.dummy_batch(n), "_mask": np.zeros((n,), np.int32)}

  def init(self, rng, batch):
    raise NotImplementedError

  def loss_fn(self, params, batch, rng):
    raise NotImplementedError

  def eval_fn(self, params, batch) -> dict:
    raise NotImplementedError

  def predict_fn(self, params, batch) -> dict:
    raise NotImplementedError

  def flops(self, example: dict, global_batch: int):
    return None

  def load_pretrained(self, params) -> tuple:
    return params, []

  def collect(self, batch, preds) -> list:
    return []

  def summarize(self, sums, records=()) -> dict:
    raise NotImplementedError

  def draw(self, batch, preds) -> list:
    raise NotImplementedError

  def format(self, preds, image_sizes=None) -> list:
    raise NotImplementedError
