"""How a train state is laid out in a checkpoint: escaped path parts, nesting, restore targets.

A train state (any pytree: TrainState, dicts, NNX states) is stored by Orbax as a nested dict
whose keys are the leaf's path parts (`alignjax.parallel.path_str`, NNX's trailing "value"
dropped), escaped so that Orbax's "."-joined storage names stay unambiguous. Typed PRNG keys
are stored as their uint32 key data (`alignjax.checkpoint` records their implementation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from alignjax import parallel


class CheckpointError(RuntimeError):
  """A checkpoint cannot be saved or restored; the message says where and why.

  (Defined here, re-exported and documented as `alignjax.checkpoint.CheckpointError`.)
  """


def _escape(part: str) -> str:
  # Orbax joins nested keys with "." in its storage names; keep parts unambiguous.
  return part.replace("%", "%25").replace(".", "%2E").replace("/", "%2F") or "%00"


def _is_key(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flat(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
  """[(escaped path parts, leaf)], treedef; NNX's trailing "value" is dropped."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, leaf in leaves:
    name = parallel.path_str(path)
    parts = tuple(_escape(p) for p in name.split("/")) if name else ("%00",)
    out.append((parts, leaf))
  return out, treedef


def _nest(pairs: list[tuple[tuple[str, ...], Any]]) -> dict:
  root: dict = {}
  for parts, value in pairs:
    node = root
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise CheckpointError(f"train state path {'/'.join(parts)} clashes with " "another leaf")
    if parts[-1] in node:
      raise CheckpointError(f"train state has two leaves at {'/'.join(parts)}")
    node[parts[-1]] = value
  return root


def _flatten_nested(tree: Any, prefix: tuple[str, ...] = ()) -> dict:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten_nested(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
  """Restore target for one template leaf (typed PRNG keys -> their uint32 key data)."""
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    leaf = np.asarray(leaf)
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if _is_key(leaf):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete tree: a template for `restore`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )
