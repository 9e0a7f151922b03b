"""One mesh for everything: mesh from config, sharding rules, sharded init, batches, hosts.

All parallelism in alignjax is a `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor")
and `NamedSharding`s over it; `pmap` is not used. Data parallelism is `jit` over the batch
dimension, which is sharded over both `DATA_AXES = ("data", "fsdp")`; parameters and optimizer
state are sharded over "fsdp" (and "tensor" where a rule says so) and replicated over "data".

Sharding rules. A rule list is `[(regex, spec), ...]`; the first regex that `re.search`es
a leaf's path wins. A path is the "/"-joined tree path of the leaf: dict keys, attribute
names and sequence indices, with the trailing `.value` of NNX variables dropped, e.g.

    params:           "blocks/0/kernel"
    optax Adam state: "0/mu/blocks/0/kernel"      (so r"kernel$" matches both)

A spec is one of
  * a PartitionSpec-like tuple, e.g. (None, "tensor") or (("data", "fsdp"),); entries are
    None, an axis name or a tuple of axis names, one per leading dimension;
  * "fsdp": the default FSDP tactic below;
  * "replicate": no sharding.
Leaves that match no rule are replicated. `DEFAULT_RULES = [(".*", "fsdp")]`.

FSDP tactic. A leaf with fewer than `FSDP_MIN_SIZE = 2**10` elements (biases, norms, scalars
such as the Adam count, PRNG keys) is replicated: sharding it saves under 4 KiB per copy in
float32 and costs a collective. Otherwise the largest dimension whose size is divisible by
the "fsdp" axis size is sharded over "fsdp" (ties: the later dimension, which for kernels
[in, out] is the output one); if none is divisible the leaf is replicated.

A tuple spec that names an axis whose size does not divide the dimension, an unknown axis,
or more entries than the leaf has dimensions raises ShardingError (a ConfigError) naming the
parameter path, its shape and the mesh axis.

Multi-host. `initialize_distributed(config)` calls `jax.distributed.initialize` when
`config.distributed.enabled`; then every process sees all devices in `jax.devices()`, builds
the same mesh, and feeds only its own part of each batch: `shard_batch` assembles a global
array from process-local data with `jax.make_array_from_process_local_data` (eq. 1:
global_batch = local_batch * process_count).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from alignjax import configs
from alignjax.configs import ConfigError

MESH_AXES = configs.MESH_AXES
DATA_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**10
DEFAULT_RULES = ((".*", "fsdp"),)

log = logging.getLogger(__name__)


class ShardingError(ConfigError):
  """A sharding rule cannot be applied to a leaf (names the path, shape and axis)."""


# --------------------------------------------------------------------------- mesh
def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh with axes ("data", "fsdp", "tensor") sized by `mesh_config` (-1 = the rest).

  `devices` defaults to all devices of all processes. Axis types are `Auto` (sharding is
  given by `NamedSharding`s passed to `jit`, not carried in types). A shape that does not
  fit the device count raises ConfigError naming the sizes and the device count.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = configs.resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch-major arrays: dimension 0 over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding over `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: mesh.shape['data'] * mesh.shape['fsdp']."""
  return math.prod(mesh.shape[a] for a in DATA_AXES)


# --------------------------------------------------------------------------- paths and rules
def _key_name(entry: Any) -> str:
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry)


def path_str(path: Sequence[Any]) -> str:
  """ "/"-joined leaf path; NNX variables' trailing "value" attribute is dropped."""
  entries = list(path)
  if entries and isinstance(entries[-1], jax.tree_util.GetAttrKey) and entries[-1].name == "value":
    entries = entries[:-1]
  return "/".join(_key_name(e) for e in entries)


def flatten_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """([(path string, leaf), ...], treedef) of `tree` (see `path_str`)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in leaves], treedef


def _axis_size(mesh: Mesh, entry: Any, path: str, shape: tuple) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  for name in names:
    if name not in mesh.shape:
      raise ShardingError(
          f"rule for {path!r} (shape {shape}) names mesh axis "
          f"{name!r}; valid axes: {', '.join(mesh.axis_names)}"
      )
  return math.prod(mesh.shape[n] for n in names)


def _fsdp_spec(shape: tuple, fsdp: int, min_size: int) -> PartitionSpec:
  if fsdp == 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if not candidates:
    return PartitionSpec()
  dim = max(candidates, key=lambda d: (shape[d], d))
  return PartitionSpec(*([None] * dim + ["fsdp"]))


def spec_for(
    path: str, shape: tuple, mesh: Mesh, spec: Any, *, min_size: int = FSDP_MIN_SIZE
) -> PartitionSpec:
  """PartitionSpec for one leaf under one rule spec (tuple, "fsdp" or "replicate")."""
  if isinstance(spec, str):
    if spec == "fsdp":
      return _fsdp_spec(shape, mesh.shape.get("fsdp", 1), min_size)
    if spec == "replicate":
      return PartitionSpec()
    raise ShardingError(
        f"rule for {path!r}: unknown tactic {spec!r}; valid: 'fsdp', "
        "'replicate' or a PartitionSpec-like tuple"
    )
  entries = tuple(spec)
  if len(entries) > len(shape):
    raise ShardingError(
        f"rule {PartitionSpec(*entries)} for {path!r} has "
        f"{len(entries)} entries but the leaf has shape {shape}"
    )
  for dim, entry in enumerate(entries):
    if entry is None:
      continue
    size = _axis_size(mesh, entry, path, shape)
    if shape[dim] % size:
      raise ShardingError(
          f"cannot shard {path!r} (shape {shape}) dimension {dim} of size "
          f"{shape[dim]} over mesh axis {entry!r} of size {size}: not divisible"
      )
  return PartitionSpec(*entries)


def _leaf_shape(leaf: Any) -> tuple | None:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else None


def param_shardings(
    abstract_tree: Any, mesh: Mesh, rules: Sequence | None = None, *, min_size: int = FSDP_MIN_SIZE
) -> Any:
  """Tree of NamedSharding (same structure as `abstract_tree`) from `rules`.

  `abstract_tree` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`),
  including NNX States and optax states. `rules=None` means `DEFAULT_RULES`.
  """
  rules = DEFAULT_RULES if rules is None else rules
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
  leaves, treedef = flatten_with_paths(abstract_tree)
  out = []
  for path, leaf in leaves:
    shape = _leaf_shape(leaf)
    spec = PartitionSpec()
    if shape is not None:
      for pattern, rule in compiled:
        if pattern.search(path):
          spec = spec_for(path, shape, mesh, rule, min_size=min_size)
          break
    out.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(treedef, out)


def describe_shardings(tree: Any) -> str:
  """One line per leaf: "path shape spec" (for logs)."""
  lines = []
  for path, leaf in flatten_with_paths(tree)[0]:
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    lines.append(f"{path} {_leaf_shape(leaf)} {spec}")
  return "\n".join(lines)


def sharded_init(
    init_fn: Callable[..., Any], mesh: Mesh, rules: Sequence | None, *args: Any
) -> Any:
  """Creates `init_fn(*args)` directly with the shardings the rules give.

  eval_shape (no memory) -> `param_shardings` -> `jax.jit(init_fn, out_shardings=...)`,
  so no device ever holds an unsharded copy. `init_fn` returns any pytree: an NNX State
  (`nnx.split(Model(cfg, rngs=nnx.Rngs(seed)))[1]`), an optax state, or a TrainState.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(*args)


def tree_shardings(tree: Any) -> Any:
  """The `.sharding` of every leaf (e.g. to pass as in/out_shardings of a train step)."""
  return jax.tree.map(lambda x: x.sharding, tree)


# --------------------------------------------------------------------------- batches
def shard_batch(process_local_tree: Any, mesh: Mesh) -> Any:
  """Global arrays sharded over data x fsdp from this process's part of the batch.

  Every leaf has the batch as dimension 0; each process passes its own equal share
  (eq. 1). On one process this is a plain device_put with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  shards = data_parallel_size(mesh)
  nproc = jax.process_count()

  def put(path, leaf):
    leaf = np.asarray(leaf)
    if leaf.ndim == 0:
      raise ShardingError(
          f"batch leaf {path_str(path)!r} is a scalar; every batch "
          "leaf needs a leading batch dimension"
      )
    global_batch = leaf.shape[0] * nproc
    if global_batch % shards:
      raise ShardingError(
          f"batch leaf {path_str(path)!r}: global batch {global_batch} "
          f"({leaf.shape[0]} per process x {nproc} processes) is not divisible by "
          f"data*fsdp={shards}"
      )
    global_shape = (global_batch,) + leaf.shape[1:]
    return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

  return jax.tree_util.tree_map_with_path(put, process_local_tree)


# --------------------------------------------------------------------------- multi-host
def _section(config: Any, name: str) -> Any:
  if isinstance(config, Mapping) or hasattr(config, "keys"):
    return config.get(name) if name in config else None
  return getattr(config, name, None)


def initialize_distributed(config: Any) -> bool:
  """`jax.distributed.initialize` when `config.distributed.enabled`; returns whether it did.

  Reads config.distributed.{enabled, coordinator_address, num_processes, process_id}
  (None/empty values are left to JAX's cluster auto-detection, e.g. on TPU pods or SLURM)
  and optionally `initialization_timeout` (seconds). CPU collectives use gloo. Must be
  called before anything else touches JAX devices. A no-op when the section is missing
  or disabled, or when JAX's distributed runtime is already initialised.
  """
  dist = _section(config, "distributed")
  if dist is None or not _section(dist, "enabled"):
    return False
  if jax.distributed.is_initialized():
    log.info("jax.distributed already initialised; not initialising again")
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  for name in ("coordinator_address", "num_processes", "process_id", "initialization_timeout"):
    value = _section(dist, name)
    if value not in (None, ""):
      kwargs[name] = value
  jax.distributed.initialize(**kwargs)
  log.info(
      "jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count()
  )
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that writes metrics, metadata and logs)."""
  return jax.process_index() == 0
