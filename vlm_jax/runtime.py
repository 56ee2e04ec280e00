"""Everything a run is made of, built from its config, and a trained run restored from its workdir.

`build(cfg, data_info=None, devices=None)` validates the config and makes the `Runtime`: the mesh
and logical-axis rules, the task (model, loss, metrics), the optimizer and its schedule, the
sharded abstract `TrainState` and the jitted init. The train step of a Runtime is
`step.make_train_step`. `restore_run` builds a workdir's run with its recorded config and restores
a checkpoint's params onto it (evaluate, predict and the Hugging Face export use it).

No TensorFlow here: the input pipeline (tf.data) is imported where batches are read, so a Runtime
also builds where TensorFlow is absent (`tools/benchmark.py` on a GPU image without it).
"""

import contextlib
import dataclasses
import os
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from vlm_jax import checkpoint, config as config_lib, optim, parallel, tasks, workdir as workdir_lib
from vlm_jax.data import sources
from vlm_jax.errors import UserError


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array  # the root key; step keys are fold_in(rng, step)


@dataclasses.dataclass
class Runtime:
  """Everything built from a config that training, evaluation, prediction and export share."""
  cfg: object
  mesh: jax.sharding.Mesh
  rules: tuple
  task: object
  tx: optax.GradientTransformation
  schedule: object
  state_sharding: TrainState
  abstract_state: TrainState
  init_state: object  # jitted rng -> TrainState
  host: sources.Host
  data_info: sources.DataInfo

  @contextlib.contextmanager
  def context(self):
    """Mesh + logical-axis rules, needed while tracing and running the model."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def open_data(cfg) -> sources.DataInfo:
  """Prepares the dataset (process 0 builds embedded datasets first) and returns its info."""
  if jax.process_index() == 0:
    builder = sources.open_source(cfg.input.data, cfg.data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
  if jax.process_index() != 0:
    builder = sources.open_source(cfg.input.data, cfg.data_dir)
  return sources.data_info(builder, cfg.input.label_key, [cfg.input.train_split, *cfg.evals.splits.split(",")])


def build(cfg, data_info=None, devices=None) -> Runtime:
  """The Runtime of `cfg` on a mesh over `devices` (default: all; abstract TPU devices compile ahead
  of time). `data_info` (a recorded one, or for a compile without the dataset) skips opening the data."""
  config_lib.validate(cfg)
  tasks.validate(cfg)  # an unknown task or its bad keys are refused before the dataset is opened
  mesh = parallel.make_mesh(cfg.mesh, devices)
  parallel.check_batch(cfg.batch_size, mesh)
  accum = cfg.get("grad_accum_steps", 1)
  if cfg.batch_size % accum:
    raise UserError(f"batch_size={cfg.batch_size} is not divisible by grad_accum_steps={accum}. Choose a divisor.")
  parallel.check_batch(cfg.batch_size // accum, mesh, "batch_size / grad_accum_steps")
  parallel.check_batch(cfg.evals.batch_size, mesh, "evals.batch_size")
  rules = parallel.RULES
  data_info = data_info or open_data(cfg)
  task = tasks.make(cfg, data_info)
  dummy = task.dummy_batch(parallel.data_shards(mesh))
  root = jax.random.PRNGKey(cfg.seed)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    try:
      boxed = jax.eval_shape(lambda r: task.init(r, dummy), root)
    except ValueError as e:  # the modules check their settings (heads vs width, pool, remat, ...)
      raise UserError(f"the model cannot be built from this config: {str(e).splitlines()[0]}. Fix the "
                      f"model.* value (--debug shows where it was raised).") from e
  param_specs = nn.get_partition_spec(boxed)
  params_abs = nn.meta.unbox(boxed)
  tx, schedule = optim.make(cfg.optimizer, cfg.total_steps, params_abs)

  def init_fn(rng):
    params = nn.meta.unbox(task.init(rng, dummy))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

  opt_specs = optim.state_specs(jax.eval_shape(tx.init, params_abs), params_abs, param_specs)
  logical = TrainState(step=P(), params=param_specs, opt_state=opt_specs, rng=P())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(init_fn, root)
  state_sharding = jax.tree.map(lambda x, sh: parallel.fit_sharding(x.shape, sh), abstract_state,
                                nn.logical_to_mesh_sharding(logical, mesh, rules))
  abstract_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                abstract_state, state_sharding)
  init_state = jax.jit(init_fn, out_shardings=state_sharding)
  host = sources.Host(jax.process_index(), jax.process_count())
  return Runtime(cfg, mesh, rules, task, tx, schedule, state_sharding, abstract_state, init_state, host, data_info)


FALLBACK_MESH = "data=1,fsdp=-1,tensor=1"


def mesh_here(run_mesh: str, mesh: str = None) -> str:
  """The mesh to restore a run onto: `mesh` if given; else the run's own where this host's devices
  can form it; else FSDP over all of them. A run trained on a pod slice (say fsdp=256) can so be
  evaluated, predicted with or exported on a workstation, its parameters split over what is here."""
  if mesh:
    return mesh
  try:
    parallel.mesh_shape(run_mesh, jax.device_count())
    return run_mesh
  except UserError:
    if jax.process_index() == 0:
      print(f"note: the run's mesh '{run_mesh}' does not fit the {jax.device_count()} device(s) here; "
            f"restoring onto '{FALLBACK_MESH}' (choose another with --mesh).", file=sys.stderr, flush=True)
    return FALLBACK_MESH


def restore_run(workdir: str, step=None, edit=None, recorded_data: bool = True, mesh: str = None):
  """(Runtime, params, step) of a training workdir at `step` (default: the latest checkpoint).

  The config is the run's own (`workdir.load_run_config`), changed by `edit(cfg)` if given, on
  `mesh_here`'s mesh; with `recorded_data` the dataset facts come from the workdir's
  data_info.json, so no dataset is needed.
  """
  workdir = workdir_lib.local_dir(workdir, "--workdir")
  cfg = workdir_lib.load_run_config(workdir)
  with cfg.unlocked():
    if edit:
      edit(cfg)
    cfg.mesh = mesh_here(cfg.mesh, mesh)
  info = workdir_lib.recorded_data_info(workdir) if recorded_data else None
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = sorted(ckpt.manager.all_steps())
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in steps:
    ckpt.close()
    raise UserError(f"no checkpoint{'' if step is None else f' at step {step}'} in {ckpt.directory} "
                    f"(steps: {steps or 'none'}); train first with `python -m vlm_jax.train`.")
  runtime = build(cfg, data_info=info)
  with runtime.context():
    params = ckpt.restore_params(step, runtime.abstract_state.params)
  ckpt.close()
  return runtime, params, step
