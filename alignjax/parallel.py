r"""One mesh for everything: mesh from config, sharding rules, sharded init, batches, hosts.

All parallelism in alignjax is a `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor")
and `NamedSharding`s over it; `pmap` is not used. Data parallelism is `jit` over the batch
dimension, which is sharded over both `DATA_AXES = ("data", "fsdp")`; parameters and optimizer
state are sharded over "fsdp" (and "tensor" where a rule says so) and replicated over "data".

Sharding rules: the one rule engine of alignjax, for every model and for whole train states.
A rule list is `[(pattern, spec), ...]` or with a third entry, `(pattern, spec, indivisible)`
(`Rule`); the first pattern that `re.search`es a leaf's path wins (`spec_for`). A path is the
"/"-joined tree path of the leaf (`path_str`): dict keys, attribute names and sequence
indices, with the trailing `.value` of NNX variables dropped, e.g.

    params:                "layers/0/attn/q/kernel"
    TrainState params:     "params/layers/0/attn/q/kernel"
    TrainState Adam state: "opt_state/1/0/mu/layers/0/attn/q/kernel"

so rules are written to match a path *suffix*, e.g. r"(^|/)layers/\d+/attn/q/kernel$": one
rule then shards a parameter and its optimizer moments (mu, nu) alike. Never anchor a rule
at "^" alone: inside a TrainState it would match nothing.

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

Indivisible dimensions. When the mesh axes of a tuple-spec entry do not divide the
dimension, the rule's `indivisible` policy decides:
  * "raise" (the default): ShardingError naming the path, shape, dimension and mesh axis. A
    hand-written rule for a known model should fit it; a mismatch is usually a config error.
  * "replicate": that dimension alone is replicated (the others keep their axes) and the
    fallback is logged at INFO (`param_shardings`: one line for the whole tree). Model
    families whose sizes vary by checkpoint use it, e.g. the LM rules
    (`alignjax.models.lm.lm_sharding_rules`: 2 KV heads over tensor=4, a vocabulary of 127).
Either way an unknown axis name, an axis used twice, or more entries than the leaf has
dimensions raises ShardingError (a ConfigError).

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
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from alignjax import configs
from alignjax.configs import ConfigError

MESH_AXES = configs.MESH_AXES
DATA_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**10
DEFAULT_RULES = ((".*", "fsdp"),)
INDIVISIBLE_POLICIES = ("raise", "replicate")

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
  return str(entry)  # plain str / int parts, e.g. of `nnx.to_flat_state` paths


def path_str(path: Sequence[Any], sep: str = "/") -> str:
  """`sep`-joined leaf path (module docstring); NNX's trailing "value" attribute is dropped.

  `path` is a jax key path (`tree_flatten_with_path`) or a tuple of plain parts
  (`nnx.to_flat_state`). THE path helper of alignjax: sharding rules, checkpoints, model I/O
  (`sep="."`) and LoRA targets all name leaves by it.
  """
  entries = list(path)
  if entries and isinstance(entries[-1], jax.tree_util.GetAttrKey) and entries[-1].name == "value":
    entries = entries[:-1]
  return sep.join(_key_name(e) for e in entries)


def flatten_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  """([(path string, leaf), ...], treedef) of `tree` (see `path_str`)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in leaves], treedef


class Rule(NamedTuple):
  """One sharding rule: `(pattern, spec)` or `(pattern, spec, indivisible)` (module docstring).

  Plain 2- or 3-tuples (e.g. from a config) are accepted wherever a Rule is.
  """

  pattern: str
  spec: Any
  indivisible: str = "raise"


def as_rule(rule: Any) -> Rule:
  """`rule` (a Rule or a 2-/3-sequence) as a validated Rule; bad rules raise ShardingError."""
  if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) not in (2, 3):
    raise ShardingError(
        f"sharding rule {rule!r}: expected (pattern, spec) or (pattern, spec, indivisible)"
    )
  rule = Rule(*rule)
  if not isinstance(rule.pattern, str):
    raise ShardingError(f"sharding rule {rule!r}: pattern must be a regex string")
  try:
    re.compile(rule.pattern)
  except re.error as e:
    raise ShardingError(f"sharding rule pattern {rule.pattern!r} is not a valid regex: {e}") from e
  if rule.indivisible not in INDIVISIBLE_POLICIES:
    raise ShardingError(
        f"sharding rule {rule.pattern!r}: indivisible={rule.indivisible!r}; valid choices: "
        f"{', '.join(INDIVISIBLE_POLICIES)}"
    )
  return rule


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


def _apply(
    rule: Rule, path: str, shape: tuple, mesh: Mesh, min_size: int, fallbacks: list | None
) -> PartitionSpec:
  """The PartitionSpec one (matching) rule gives one leaf."""
  spec = rule.spec
  if isinstance(spec, str):
    if spec == "fsdp":
      return _fsdp_spec(shape, mesh.shape.get("fsdp", 1), min_size)
    if spec == "replicate":
      return PartitionSpec()
    raise ShardingError(
        f"rule for {path!r}: unknown tactic {spec!r}; valid: 'fsdp', "
        "'replicate' or a PartitionSpec-like tuple"
    )
  entries = tuple(tuple(e) if isinstance(e, list) else e for e in spec)
  if len(entries) > len(shape):
    raise ShardingError(
        f"rule {PartitionSpec(*entries)} for {path!r} has "
        f"{len(entries)} entries but the leaf has shape {shape}"
    )
  used = [n for e in entries if e is not None for n in (e if isinstance(e, tuple) else (e,))]
  if len(used) != len(set(used)):
    raise ShardingError(f"rule {PartitionSpec(*entries)} for {path!r} uses a mesh axis twice")
  out = []
  for dim, entry in enumerate(entries):
    size = 1 if entry is None else _axis_size(mesh, entry, path, shape)
    if shape[dim] % size == 0:
      out.append(entry)
      continue
    what = (
        f"{path!r} (shape {shape}) dimension {dim} of size {shape[dim]} over mesh axis "
        f"{entry!r} of size {size}"
    )
    if rule.indivisible == "raise":
      raise ShardingError(
          f"cannot shard {what}: not divisible (rule {rule.pattern!r}; give the rule "
          "indivisible='replicate' to replicate such dimensions instead)"
      )
    out.append(None)  # indivisible="replicate"
    if fallbacks is None:
      log.info("replicating %s: not divisible", what)
    else:
      fallbacks.append(what)
  return PartitionSpec(*out)


def spec_for(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence | None = None,
    *,
    min_size: int = FSDP_MIN_SIZE,
    _fallbacks: list | None = None,
) -> PartitionSpec:
  """PartitionSpec of one leaf: the first rule whose pattern `re.search`es `path` (module
  docstring); no match: replicated. `rules=None` means `DEFAULT_RULES`."""
  shape = tuple(shape)
  for rule in DEFAULT_RULES if rules is None else rules:
    rule = as_rule(rule)
    if re.search(rule.pattern, path):
      return _apply(rule, path, shape, mesh, min_size, _fallbacks)
  return PartitionSpec()


def _leaf_shape(leaf: Any) -> tuple | None:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else None


def param_shardings(
    abstract_tree: Any, mesh: Mesh, rules: Sequence | None = None, *, min_size: int = FSDP_MIN_SIZE
) -> Any:
  """Tree of NamedSharding (same structure as `abstract_tree`) from `rules`.

  `abstract_tree` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`),
  including NNX States, optax states and whole TrainStates (rules match path suffixes, so a
  parameter's rule also shards its optimizer moments). `rules=None` means `DEFAULT_RULES`.
  Dimensions replicated by an `indivisible="replicate"` rule are logged in one INFO line.
  """
  rules = [as_rule(r) for r in (DEFAULT_RULES if rules is None else rules)]
  leaves, treedef = flatten_with_paths(abstract_tree)
  fallbacks: list[str] = []
  out = []
  for path, leaf in leaves:
    shape = _leaf_shape(leaf)
    spec = PartitionSpec()
    if shape is not None:
      spec = spec_for(path, shape, mesh, rules, min_size=min_size, _fallbacks=fallbacks)
    out.append(NamedSharding(mesh, spec))
  if fallbacks:
    shown = "; ".join(fallbacks[:8]) + (f"; ... ({len(fallbacks) - 8} more)" * (len(fallbacks) > 8))
    log.info("replicated %d dimension(s) the mesh axes do not divide: %s", len(fallbacks), shown)
  return jax.tree_util.tree_unflatten(treedef, out)


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x` (a host array or a fully addressable jax.Array, PRNG keys included) with `sharding`,
  which may span the devices of several processes: every process passes the same whole value
  and keeps the shards of its own devices (`jax.device_put` refuses shardings over devices of
  other processes)."""
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    data = put_global(jax.random.key_data(x), NamedSharding(sharding.mesh, PartitionSpec()))
    key = jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)
    return key(data)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_on_mesh(tree: Any, mesh: Mesh, rules: Sequence | None = None) -> Any:
  """`tree` with every leaf that is not already on exactly `mesh`'s devices placed there with
  the sharding `rules` give (leaves already on the mesh are kept as they are; `put_global`)."""
  devices = set(mesh.devices.flat)
  shardings = param_shardings(tree, mesh, rules)

  def put(leaf, sharding):
    on_mesh = isinstance(leaf, jax.Array) and set(leaf.sharding.device_set) == devices
    return leaf if on_mesh else put_global(leaf, sharding)

  return jax.tree.map(put, tree, shardings)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises ShardingError unless `batch_size` is a multiple of data*fsdp of `mesh`."""
  shards = data_parallel_size(mesh)
  if batch_size % shards:
    raise ShardingError(
        f"{what}: batch size {batch_size} is not divisible by the data-parallel size "
        f"data*fsdp={shards} of the mesh {dict(mesh.shape)}; pad the batch to a multiple "
        f"of {shards} (e.g. repeat a row and drop its result) or use a smaller data axis"
    )


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """The largest number of bytes any one device holds of the arrays (or shapes) `tree` laid
  out by `shardings` (a matching tree of NamedShardings): each leaf's shard size, summed."""
  total = {}
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
    shard = sharding.shard_shape(tuple(leaf.shape))
    nbytes = int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize  # PRNG keys too
    for device in sharding.device_set:
      total[device] = total.get(device, 0) + nbytes
  return max(total.values(), default=0)


def device_memory_limit(device: Any = None) -> int | None:
  """Bytes the accelerator lets a program use (`memory_stats()["bytes_limit"]`), or None where
  the platform does not say (the CPU)."""
  device = jax.local_devices()[0] if device is None else device
  try:
    stats = device.memory_stats()
  except Exception:  # platforms without memory statistics
    return None
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def check_fits_in_memory(
    what: str, tree: Any, shardings: Any, *, limit: int | None = None, hint: str = ""
) -> int:
  """Raises ShardingError, before anything is compiled or allocated, when the per-device share
  of `tree` under `shardings` alone exceeds the device memory `limit` (default:
  `device_memory_limit()`; no check where it is unknown). Returns the per-device bytes."""
  need = bytes_per_device(tree, shardings)
  limit = device_memory_limit() if limit is None else limit
  if limit is not None and need > limit:
    raise ShardingError(
        f"{what} needs {need / 1e9:.2f} GB per device before any activation, more than the "
        f"{limit / 1e9:.2f} GB a device holds; {hint or 'shard it over more devices (mesh.fsdp)'}"
    )
  return need


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
