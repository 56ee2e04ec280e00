"""python -m vlm_jax.compile --config configs/NAME.py[:ARG] [--topology v5p-128] [--unroll] [--config.KEY=VALUE ...]

A recipe compiled ahead of time for a TPU slice, on a CPU host: the train step that
`python -m vlm_jax.train` would run (`runtime.build` + `step.make_train_step`, the same config),
and for text tasks the evaluation step and the decoding (predict) step too, through the real TPU
compiler of libtpu (run with JAX_PLATFORMS=cpu). No dataset is read: what the model needs from
the data comes from the recipe's `compile` block (`num_classes`; the tokenizer is a stand-in with
`input.vocab_size` ids unless `input.tokenizer` names one). The trainer ignores that block.

Reports, per chip: memory (arguments, temp, outputs) against the chip's HBM; the compiler's
step-time estimate and the MFU it implies against the analytic FLOP count of `flops`; the
collectives per step by kind next to the analytic minimum (`hlo_collectives`). Ends with one JSON
line of all figures; exits non-zero when a step does not fit the HBM.
"""

import json
import os
import sys
import tempfile

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from vlm_jax import config as config_lib, flops, hlo_collectives, parallel, runtime as runtime_lib, slices, tasks
from vlm_jax.step import make_train_step
from vlm_jax.data import sources, tokenizer as tokenizer_lib
from vlm_jax.errors import UserError, run_cli
from vlm_jax.tasks.common import DTYPES

GiB = slices.GiB
TOWERS = ("encoder", "decoder", "image", "text")  # nested model blocks of the two-tower models


def _model_blocks(cfg) -> list:
  return [cfg.model] + [cfg.model[k] for k in TOWERS if k in cfg.model]


def prepare(cfg, unroll: bool = False) -> None:
  """Settings for compiling on a CPU host for a TPU: XLA attention (the host's default backend is
  the CPU, and a TPU has no cuDNN), unrolled layers with `unroll`, and a
  stand-in tokenizer of `input.vocab_size` ids when the run would train one on the dataset."""
  for block in _model_blocks(cfg):
    if "attention" in block:
      block.attention = "xla"
    if unroll and "scan_layers" in block:
      block.scan_layers = False
  if not cfg.input.tokenizer and not cfg.init_from:  # text tasks read it; the others ignore it
    cfg.input.tokenizer = standin_tokenizer(cfg.input.vocab_size)


def standin_tokenizer(vocab_size: int) -> str:
  """Path of a word-level tokenizer with exactly `vocab_size` ids (the specials first): the shapes of
  the trained one, without its dataset."""
  import tokenizers  # the tokenizer library; only text tasks need it

  vocab = {t: i for i, t in enumerate(tokenizer_lib.SPECIAL_TOKENS)}
  vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=tokenizer_lib.UNK))
  path = os.path.join(tempfile.mkdtemp(prefix="vlm_jax_compile_"), tokenizer_lib.TOKENIZER_FILE)
  tokenizer_lib.Tokenizer(backend, source="stand-in").save(path)
  return path


def data_info(cfg, num_classes: int = 0) -> sources.DataInfo:
  """What the task reads from the dataset, from the recipe's `compile` block (or `num_classes`)."""
  block = cfg.get("compile") or {}
  n = num_classes or block.get("num_classes", 0)
  if tasks.module(cfg.task).Task.needs_classes and not n:
    raise UserError(f"{cfg.task} needs the number of classes to compile: pass --num_classes=N (or add "
                    "compile.num_classes to the recipe).")
  return sources.DataInfo(cfg.input.data, int(n), [f"class_{i}" for i in range(n)] if n else None, {}, ())


def recipe_topologies(cfg) -> list:
  block = cfg.get("compile") or {}
  return [t.strip() for t in str(block.get("topologies", "")).split(",") if t.strip()]


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs."""
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def _abstract_batch(task, n: int, mesh, eval_mask: bool = False) -> dict:
  sharding = parallel.batch_sharding(mesh)
  batch = task.eval_dummy_batch(n) if eval_mask else task.dummy_batch(n)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def _memory(compiled, resident: int, hbm: int) -> dict:
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
         "resident_bytes": resident}  # state that stays in HBM beside this step's arguments
  out["total_bytes"] = (out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + resident)
  out["headroom"] = 1 - out["total_bytes"] / hbm
  return out


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return {"optimal_seconds": cost.get("optimal_seconds"), "flops": cost.get("flops")}


def estimate(cost: dict, analytic_step_flops, sl: slices.Slice, scanned: bool) -> dict:
  """The compiler's step-time estimate, the MFU it implies, and whether to trust it: `mfu` is set
  only when `status` is "ok" (`implied_mfu` always, where there is a time and a FLOP count)."""
  sec, compiler_flops = cost["optimal_seconds"], cost["flops"]
  out = {"step_seconds": sec, "mfu": None, "implied_mfu": None, "compiler_flops_per_chip": compiler_flops,
         "status": "ok", "note": ""}
  if sec is None or sec <= 0:
    out.update(status="unavailable", note=f"the compiler gave no usable estimate (optimal_seconds={sec})")
    return out
  if analytic_step_flops:
    out["implied_mfu"] = analytic_step_flops / (sl.chips * sl.peak_flops * sec)
  if scanned:
    out.update(status="scan_counted_once", note="scanned layers are counted once by the compiler, so the "
               "estimate leaves out the other layers of each stack; rerun with --unroll for the whole step")
  elif out["implied_mfu"] is not None and (
      out["implied_mfu"] > 1 or (compiler_flops and compiler_flops * sl.chips < 0.5 * analytic_step_flops)):
    out.update(status="inconsistent", note=f"implied MFU {out['implied_mfu']:.2f}, or the compiler's FLOP count "
               f"({compiler_flops:.3g} per chip) is under half the analytic count")
  if out["status"] == "ok":
    out["mfu"] = out["implied_mfu"]
  return out


def compile_recipe(cfg, sl: slices.Slice, num_classes: int = 0) -> dict:
  """Compiles the recipe's steps for the slice; returns every figure (see the module docstring)."""
  rt = runtime_lib.build(cfg, data_info(cfg, num_classes), devices=slices.devices(sl))
  task, mesh = rt.task, rt.mesh
  train_step = make_train_step(rt)
  train_args = (rt.abstract_state, _abstract_batch(task, cfg.batch_size, mesh))
  with rt.context():
    compiled = {"train": _compile(train_step.lower(*train_args), "train", cfg, sl)}
    if task.tokenizer is not None:  # text tasks: their evaluation and decoding programs too
      params = rt.abstract_state.params
      batch = _abstract_batch(task, cfg.evals.batch_size, mesh, eval_mask=True)
      compiled["eval"] = _compile(jax.jit(task.eval_fn).lower(params, batch), "eval", cfg, sl)
      compiled["decode"] = _compile(jax.jit(task.predict_fn).lower(params, batch), "decode", cfg, sl)
  state_bytes = per_chip_bytes(rt.abstract_state)
  params_bytes = per_chip_bytes(rt.abstract_state.params)
  steps = {name: _memory(c, 0 if name == "train" else state_bytes - params_bytes, sl.hbm_bytes)
           for name, c in compiled.items()}
  per_example = flops.train_flops(task.flops(task.dummy_batch(1), cfg.batch_size))
  step_flops = per_example * cfg.batch_size if per_example else None
  scanned = any(b.get("scan_layers", False) for b in _model_blocks(cfg))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rt.abstract_state.params))
  gathered = np.dtype(DTYPES[cfg.model.get("dtype", "float32")]).itemsize  # XLA gathers params cast to it
  minimum, formula = hlo_collectives.analytic_minimum(n_params * gathered, dict(mesh.shape))
  coll = hlo_collectives.count(compiled["train"].as_text())
  return {
      "topology": sl.name, "libtpu_topology": sl.topology, "device_kind": sl.device_kind, "chips": sl.chips,
      "hbm_bytes": sl.hbm_bytes, "peak_flops": sl.peak_flops, "task": cfg.task, "mesh": dict(mesh.shape),
      "batch_size": cfg.batch_size, "batch_per_chip": cfg.batch_size / sl.chips, "params": n_params,
      "steps": steps, "fits": all(s["total_bytes"] <= sl.hbm_bytes for s in steps.values()),
      "analytic_flops_per_step": step_flops,
      "estimate": estimate(_cost(compiled["train"]), step_flops, sl, scanned),
      "collectives": coll, "collectives_minimum_bytes": minimum, "collectives_minimum_formula": formula,
      "collectives_over_minimum": coll["traffic_bytes"] / minimum if minimum else None,
      "replicated": replicated_args(compiled["train"], train_args),
  }


def replicated_args(compiled, args, min_elements: int = 1_000_000) -> list:
  """Paths of the compiled step's arguments with more than `min_elements` elements that it holds
  whole on every chip: a logical axis name the rules do not map, or a dimension the mesh does not
  divide (`parallel.fit_sharding`), leaves them replicated."""
  leaves = jax.tree_util.tree_flatten_with_path(args)[0]
  shardings = jax.tree.leaves(compiled.input_shardings[0])
  return [jax.tree_util.keystr(path) for (path, x), sh in zip(leaves, shardings)
          if np.prod(x.shape) > min_elements and sh.is_fully_replicated]


def _gib(b) -> str:
  return f"{b / GiB:.2f} GiB"


def report_lines(r: dict) -> list:
  lines = [f"{r['task']} on {r['topology']} ({r['chips']} x {r['device_kind']}, {_gib(r['hbm_bytes'])} HBM per chip; "
           f"libtpu {r['libtpu_topology']}), mesh {r['mesh']}, batch {r['batch_size']} "
           f"({r['batch_per_chip']:g} per chip), {r['params'] / 1e6:.1f}M params"]
  lines.append("memory per chip (compiled):")
  for name, m in r["steps"].items():
    extra = f" + resident optimizer state {_gib(m['resident_bytes'])}" if m["resident_bytes"] else ""
    lines.append(f"  {name:6s} arguments {_gib(m['argument_bytes'])}, temp {_gib(m['temp_bytes'])}, outputs "
                 f"{_gib(m['output_bytes'])} (donated {_gib(m['alias_bytes'])}){extra} = {_gib(m['total_bytes'])} "
                 f"of {_gib(r['hbm_bytes'])}: headroom {100 * m['headroom']:.1f}%")
  e = r["estimate"]
  if e["status"] == "unavailable":
    lines.append(f"step time: {e['note']}")
  else:
    mfu = f", implied MFU {100 * e['implied_mfu']:.1f}%" if e["implied_mfu"] is not None else " (no analytic FLOP count)"
    lines.append(f"step time (the compiler's estimate, not a measurement): {1e3 * e['step_seconds']:.2f} ms{mfu}"
                 + (f" [{e['status']}: {e['note']}]" if e["status"] != "ok" else ""))
  if r["analytic_flops_per_step"]:
    lines.append(f"analytic FLOPs per step: {r['analytic_flops_per_step']:.4g} "
                 f"({r['analytic_flops_per_step'] / r['chips']:.4g} per chip)")
  c = r["collectives"]
  lines.append("collectives per train step, per chip" + (f" ({c['loops_counted_once']} loop(s) of unknown trip "
                                                         f"count counted once)" if c["loops_counted_once"] else "") + ":")
  for kind, v in c["ops"].items():
    if v["count"]:
      lines.append(f"  {kind:18s} {v['count']:5d} ops  {_gib(v['bytes'])}")
  ratio = f" = {r['collectives_over_minimum']:.2f}x" if r["collectives_over_minimum"] else ""
  lines.append(f"  traffic {_gib(c['traffic_bytes'])} (all-reduce counted twice) vs analytic minimum "
               f"{_gib(r['collectives_minimum_bytes'])}{ratio} ({r['collectives_minimum_formula']})")
  if r["replicated"]:
    lines.append(f"warning: {len(r['replicated'])} arguments over 1M elements are replicated on every chip: "
                 f"{', '.join(r['replicated'][:6])}")
  return lines


def _what_to_change(cfg, sl: slices.Slice) -> str:
  return (f"Lower the batch per chip (batch_size={cfg.batch_size} is {cfg.batch_size / sl.chips:g} per chip; or "
          f"--config.grad_accum_steps=2), recompute more (model.remat=nothing_saveable), or spread the state "
          f"over more chips (mesh fsdp, a larger slice).")


def _compile(lowered, name: str, cfg, sl: slices.Slice):
  """`lowered.compile()`; the TPU compiler's out-of-memory refusal becomes a UserError saying what to change."""
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
      raise
    raise UserError(f"{cfg.task} does not fit {sl.name}: the TPU compiler refused its {name} step "
                    f"({text[:300].rstrip('.')}). {_what_to_change(cfg, sl)}") from None


def check_fits(r: dict, cfg) -> None:
  name, m = min(r["steps"].items(), key=lambda kv: kv[1]["headroom"])
  if m["total_bytes"] > r["hbm_bytes"]:
    raise UserError(f"{cfg.task} does not fit {r['topology']}: its {name} step needs {_gib(m['total_bytes'])} per chip "
                    f"of {_gib(r['hbm_bytes'])} HBM. {_what_to_change(cfg, slices.lookup(r['topology']))}")


def run(cfg, topology: str = "", unroll: bool = False, num_classes: int = 0, out=sys.stdout) -> dict:
  names = [topology] if topology else recipe_topologies(cfg)
  if not names:
    raise UserError("no TPU slice to compile for: pass --topology (e.g. --topology=v5p-128), or name the "
                    "recipe's targets in compile.topologies.")
  sl = slices.lookup(names[0])
  missing = slices.libtpu_missing()
  if missing:
    raise UserError(f"compiling for TPU needs libtpu: {missing}, matching the installed jax.")
  prepare(cfg, unroll)
  r = compile_recipe(cfg, sl, num_classes)
  for line in report_lines(r):
    print(line, file=out)
  print(json.dumps(r, sort_keys=True), file=out, flush=True)
  check_fits(r, cfg)
  return r


FLAGS = flags.FLAGS


def main(argv=None):
  argv = sys.argv if argv is None else argv
  config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/vit_b16_imagenet.py[:ARG].", lock_config=True)
  flags.DEFINE_string("topology", "", "TPU slice, e.g. v5p-128, v5e-256, v4-32, v6e-64 (default: the recipe's "
                      "first compile.topologies entry).")
  flags.DEFINE_bool("unroll", False, "Unroll every layer stack (scan_layers=False) so the compiler's step-time "
                    "estimate covers the whole step (a scanned layer is counted once).")
  flags.DEFINE_integer("num_classes", 0, "Classes of the classification head (default: compile.num_classes).")
  flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
  flags.mark_flags_as_required(["config"])

  def go():
    config_lib.parse_argv(FLAGS, argv)
    run(FLAGS.config, FLAGS.topology, FLAGS.unroll, FLAGS.num_classes)
  sys.exit(run_cli(go, argv))


if __name__ == "__main__":
  main()
