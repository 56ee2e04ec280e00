"""Collectives of a compiled XLA program, read from its HLO text, and the mesh's analytic minimum.

`count(hlo_text)` returns, per kind (all-reduce, all-gather, reduce-scatter, collective-permute,
all-to-all), the number of ops executed per step and their bytes per device. An op inside a
while loop (a scanned layer stack, a gradient-accumulation scan, the contrastive ring) counts
once per iteration when the loop's trip count can be read (XLA's `known_trip_count`, or the one
constant its condition compares a counter with); otherwise it counts once and `loops_counted_once` says how many loops that was.

Bytes are the buffer each device moves through the op: the gathered output of an all-gather, the
input of a reduce-scatter, the operand of an all-reduce / collective-permute / all-to-all. Traffic
weighs an all-reduce twice (a reduce-scatter followed by an all-gather), the others once; the
(n - 1) / n factor of ring algorithms is left out of both sides of the comparison.

`analytic_minimum(param_bytes, mesh_shape)`: the least traffic per device of one step of the
sharded train step, with P the bytes of all parameters in the dtype they are gathered in:
  FSDP (fsdp > 1)        all-gather params forward + again backward + reduce-scatter gradients = 3 P
  data parallel only     all-reduce of the gradients = 2 P
  neither (one device)   0
Tensor parallelism adds activation traffic that depends on the model; it is not in the minimum.
"""

import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
TRAFFIC_WEIGHT = {"all-reduce": 2, "all-gather": 1, "reduce-scatter": 1, "collective-permute": 1, "all-to-all": 1}

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2,
                "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_CALLED = re.compile(r"\b(?:calls|body|to_apply|branch_computations|async_execution_thread_computations)=\{?%?([\w.\-, %]+)\}?")
_OPERAND = re.compile(r"%([\w.\-]+)")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple sums its elements)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return int(total)


def _parse(text: str):
  """{computation: [(name, shape, opcode, rest)]}, the entry's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      current = m.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      comps[current].append(m.groups())
  return comps, entry


def _trip_count(while_rest: str, condition: list):
  """The loop's `known_trip_count` (backend config), else the one integer constant its condition
  compares the counter with; None when neither says."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_rest)
  if known:
    return int(known.group(1))
  consts = {int(v) for _, shape, op, rest in condition if op == "constant" and shape.startswith(("s32[]", "s64[]", "u32[]"))
            for v in re.findall(r"^(-?\d+)\)", rest)}
  return consts.pop() if len(consts) == 1 else None


def count(text: str) -> dict:
  """{'ops': {kind: {'count', 'bytes'}}, 'traffic_bytes', 'loops_counted_once'} per device per step."""
  comps, entry = _parse(text)
  shapes = {name: shape for ops in comps.values() for name, shape, _, _ in ops}
  times, once = {}, 0

  def visit(comp, mult):
    nonlocal once
    times[comp] = times.get(comp, 0) + mult
    for _, _, op, rest in comps.get(comp, ()):
      if op.endswith(("-done", "-update")):
        continue
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
        cond = re.search(r"condition=%?([\w.\-]+)", rest).group(1)
        n = _trip_count(rest, comps.get(cond, []))
        once += n is None
        visit(body, mult * (n or 1))
        continue
      for group in _CALLED.findall(rest):
        for callee in re.split(r"[,\s%]+", group):
          if callee in comps:
            visit(callee, mult)

  if entry is not None:
    visit(entry, 1)
  ops = {k: {"count": 0, "bytes": 0} for k in KINDS}
  for comp, mult in times.items():
    for _, shape, op, rest in comps[comp]:
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in KINDS:
        continue
      args = rest.split(")", 1)[0]
      operand = sum(shape_bytes(shapes.get(a, "")) for a in _OPERAND.findall(args))
      result = shape_bytes(shape)
      if kind == "all-gather":  # an async start's result holds the operands too
        moved = result - operand if op.endswith("-start") else result
      else:
        moved = operand or result
      ops[kind]["count"] += mult
      ops[kind]["bytes"] += mult * moved
  traffic = sum(TRAFFIC_WEIGHT[k] * v["bytes"] for k, v in ops.items())
  return {"ops": ops, "traffic_bytes": traffic, "loops_counted_once": once}


def analytic_minimum(param_bytes: int, mesh_shape: dict) -> tuple:
  """(bytes per device per step, the formula in words) for the train step's parameter traffic."""
  if mesh_shape.get("fsdp", 1) > 1:
    return 3 * param_bytes, "FSDP: all-gather params forward and backward + reduce-scatter grads = 3 x param bytes"
  if mesh_shape.get("data", 1) > 1:
    return 2 * param_bytes, "data parallel: all-reduce of the gradients = 2 x param bytes"
  return 0, "one data shard: no gradient traffic"
