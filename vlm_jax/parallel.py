"""Device mesh, logical-axis rules, batch sharding and multi-host initialisation.

Models annotate parameters with logical names (`embed`, `mlp`, `heads`, ...) and activations
with `act_*` names; `RULES` maps both onto the mesh axes (`data`, `fsdp`, `tensor`), so data
parallel, FSDP (ZeRO-3) and tensor parallel differ only in the mesh sizes of the config:
- batch dimension of activations over (data, fsdp): every device sees distinct examples;
- parameters' `embed` dimension over fsdp: params and optimizer state are sharded, XLA gathers
  them per layer;
- `mlp`, `heads`, `vocab` over tensor: Megatron-style split of MLP hidden units and heads.
Activation names are separate from parameter names because one mesh axis may appear only once
in a sharding (`batch` and `embed` both want fsdp).
"""

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax.config import MESH_AXES, parse_mesh
from vlm_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")

RULES = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("length", None),
)


def mesh_shape(spec: str, num_devices: int) -> dict:
  """Resolves a mesh spec (with at most one -1) against the number of devices."""
  sizes = parse_mesh(spec)
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if -1 in sizes.values():
    if num_devices % known:
      raise UserError(f"mesh '{spec}': the fixed axes multiply to {known}, which does not divide the "
                      f"{num_devices} devices present. Choose sizes whose product divides {num_devices}.")
    sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
  total = int(np.prod(list(sizes.values())))
  if total != num_devices:
    raise UserError(f"mesh '{spec}' needs {total} devices but {num_devices} are present. "
                    f"Use -1 for one axis (e.g. data=-1,fsdp=1,tensor=1) or matching sizes.")
  return sizes


def make_mesh(spec: str, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except NotImplementedError as e:  # a TPU torus that these axis sizes cannot be laid on
    raise UserError(f"mesh {dict(zip(MESH_AXES, shape))} cannot be laid out on these {len(devices)} devices: on a "
                    f"TPU slice each axis size must be a product of some of the torus dimensions (jax: "
                    f"{' '.join(str(e).split())[:240]}). Choose other axis sizes with --config.mesh.") from e


def fit_sharding(shape, sharding: NamedSharding) -> NamedSharding:
  """Drops the mesh axes of any dimension they do not divide (e.g. an odd vocabulary over tensor=2).

  jit cannot place such a dimension on those axes; the parameter is then replicated along them.
  """
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for i, axes in enumerate(spec):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if names and shape[i] % int(np.prod([sharding.mesh.shape[a] for a in names])):
      spec[i] = None
  return NamedSharding(sharding.mesh, P(*spec))


def data_shards(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(batch_size: int, mesh, what: str = "batch_size") -> int:
  """Returns the per-process batch; the global batch must split over data shards and processes."""
  shards, procs = data_shards(mesh), jax.process_count()
  if batch_size % shards or batch_size % procs:
    raise UserError(f"{what}={batch_size} is not divisible by the {shards} data-parallel shards "
                    f"(data x fsdp) and {procs} processes. Use a multiple of {np.lcm(shards, procs)}.")
  return batch_size // procs


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def initialize_distributed(cfg) -> None:
  """Starts jax.distributed for multi-host runs.

  `distributed.enable`: "auto" initialises when a cluster environment is detected (Cloud TPU
  pod, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS), "true" always, "false" never. Explicit
  coordinator address / process count / id override the detection.
  """
  d = cfg.distributed
  mode = str(d.enable).lower()
  if mode in ("false", "0", "no") or jax.distributed.is_initialized():
    return
  explicit = bool(d.coordinator_address)
  detected = any(k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
                                           "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  if mode == "auto" and not (explicit or detected):
    return
  kwargs = {}
  if explicit:
    if not (isinstance(d.num_processes, int) and isinstance(d.process_id, int)
            and 0 <= d.process_id < d.num_processes):
      raise UserError(f"distributed.coordinator_address='{d.coordinator_address}' also needs "
                      f"distributed.num_processes (>= 1) and this process's distributed.process_id "
                      f"(0 .. num_processes - 1); got num_processes={d.num_processes}, process_id={d.process_id}.")
    kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  elif not detected:
    raise UserError("distributed.enable=true, but no cluster environment was detected (Cloud TPU pod, SLURM, "
                    "Open MPI or JAX_COORDINATOR_ADDRESS) and distributed.coordinator_address is empty. Set "
                    "coordinator_address, num_processes and process_id, or use distributed.enable=auto.")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    where = f"coordinator {d.coordinator_address}" if explicit else "the detected cluster environment"
    raise UserError(f"jax.distributed.initialize failed with {where}: {str(e).strip().splitlines()[0][:300]}. "
                    f"Check that every process got the same coordinator address and process count, and its own "
                    f"process_id.") from e
  if jax.default_backend() == "cpu":
    # Across CPU processes (gloo collectives) jax 0.12 can hang a step whose executable one process
    # loads from the persistent compilation cache (written by process 0 only) while the other
    # compiles it: their collectives never pair up. Every process compiles its own instead.
    jax.config.update("jax_enable_compilation_cache", False)
