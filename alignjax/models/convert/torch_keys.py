"""Key tables between PyTorch state dicts and NNX parameter paths, and strict loading.

Used by the Stable Diffusion components (diffusers' UNet and VAE, transformers' CLIP). A
`Key(torch, ours, layout)` maps one tensor of the PyTorch state dict to one parameter path
(`parallel.path_str` form, e.g. "down_blocks/0/resnets/1/conv1/kernel"). Layouts, our shape
<-> PyTorch shape:

    same      identical                                  (biases, norms, embeddings)
    linear    [in, out]          <-> [out, in]            (nn.Linear weight)
    conv      [kh, kw, in, out]  <-> [out, in, kh, kw]    (nn.Conv2d weight)
    conv1x1   [in, out]          <-> [out, in, 1, 1]      (a 1x1 nn.Conv2d held as a Dense)

`load_state` fills an abstract NNX state from a safetensors checkpoint one tensor at a time
(memory-mapped read -> layout -> `jax.make_array_from_callback` onto the target sharding), so
no full host copy is made per device. Checks, in both directions: the table covers every
parameter exactly; every tensor the table names exists with the shape the model expects;
every tensor of the checkpoint is used (names matching `ignored` aside). Each failure is a
`CheckpointError` naming the directory, file and tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, SingleDeviceSharding

from alignjax import parallel
from alignjax.models.convert.safetensors_io import (
    CheckpointError,
    SafetensorsCheckpoint,
    weight_files,
    write_checkpoint,
)
from alignjax.parallel import path_str

LAYOUTS = ("same", "linear", "conv", "conv1x1")


@dataclasses.dataclass(frozen=True)
class Key:
  torch: str
  ours: str
  layout: str = "same"

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"Key {self.torch!r}: layout {self.layout!r} is not one of {LAYOUTS}")


def torch_shape(layout: str, shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch shape of a parameter of our `shape` stored in `layout`."""
  s = tuple(shape)
  if layout == "same":
    return s
  if layout == "linear":
    return s[::-1]
  if layout == "conv":
    return (s[3], s[2], s[0], s[1])
  if layout == "conv1x1":
    return (s[1], s[0], 1, 1)
  raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def to_ours(layout: str, a: np.ndarray) -> np.ndarray:
  """A PyTorch tensor -> our layout (views where possible)."""
  if layout == "same":
    return a
  if layout == "linear":
    return a.T
  if layout == "conv":
    return a.transpose(2, 3, 1, 0)
  if layout == "conv1x1":
    return a.reshape(a.shape[:2]).T
  raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def to_torch(layout: str, a: np.ndarray) -> np.ndarray:
  """Our array -> the PyTorch layout (inverse of `to_ours`)."""
  if layout == "same":
    return a
  if layout == "linear":
    return a.T
  if layout == "conv":
    return a.transpose(3, 2, 0, 1)
  if layout == "conv1x1":
    return a.T[:, :, None, None]
  raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def param_shapes(state: nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
  """path -> value (array or ShapeDtypeStruct) of every variable of `state`."""
  return {path_str(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def check_table(table: Sequence[Key], state: nnx.State, what: str) -> None:
  """The table must name every parameter of `state` exactly once (a bug otherwise)."""
  ours = [k.ours for k in table]
  shapes = param_shapes(state)
  dup = sorted({p for p in ours if ours.count(p) > 1})
  diff = sorted(set(ours) ^ set(shapes))
  if dup or diff:
    raise AssertionError(f"{what}: key table / model mismatch: duplicated {dup}, unmatched {diff}")


def load_state(
    abstract: nnx.State,
    table: Sequence[Key],
    ckpt: SafetensorsCheckpoint,
    *,
    what: str,
    mesh=None,
    rules=None,
    ignored: re.Pattern | None = None,
) -> nnx.State:
  """`abstract` (from `nnx.eval_shape`) filled from `ckpt` by `table`, each parameter placed on
  its sharding (`parallel.spec_for(path, shape, mesh, rules)`; the default device when `mesh`
  is None). Values take the abstract parameters' dtypes."""
  check_table(table, abstract, what)
  shapes = param_shapes(abstract)
  directory = ckpt.directory
  missing = [k.torch for k in table if k.torch not in ckpt.tensors]
  if missing:
    raise CheckpointError(
        f"{directory}: {what} checkpoint lacks {len(missing)} tensor(s) its config needs: "
        f"{missing[:8]}"
    )
  used = {k.torch for k in table}
  unused = sorted(
      n for n in ckpt.tensors if n not in used and not (ignored and ignored.fullmatch(n))
  )
  if unused:
    raise CheckpointError(
        f"{directory}: {what} checkpoint has {len(unused)} tensor(s) its config does not use: "
        f"{unused[:8]}"
    )
  device = SingleDeviceSharding(jax.devices()[0])
  values = {}
  for k in table:
    info, target = ckpt.tensors[k.torch], shapes[k.ours]
    expected = torch_shape(k.layout, target.shape)
    if tuple(info.shape) != expected:
      raise CheckpointError(
          f"{os.path.join(directory, info.file)}: tensor {k.torch!r} has shape "
          f"{tuple(info.shape)}, expected {expected} for this {what} config"
      )
    part = to_ours(k.layout, ckpt.get(k.torch)).astype(target.dtype, copy=False)
    sharding = (
        device
        if mesh is None
        else NamedSharding(mesh, parallel.spec_for(k.ours, part.shape, mesh, rules))
    )
    # Each device gets a private copy of its shard, never an alias of the read-only map.
    values[k.ours] = jax.make_array_from_callback(
        part.shape, sharding, lambda idx, a=part: np.array(a[idx], copy=True)
    )
  return nnx.from_flat_state(
      [(path, var.replace(values[path_str(path)])) for path, var in nnx.to_flat_state(abstract)]
  )


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def torch_entries(state: nnx.State, table: Sequence[Key], dtype) -> tuple[list, callable]:
  """(entries, produce) for `safetensors_io.write_checkpoint`: the PyTorch tensors of `state`
  by `table`, stored as `dtype`, fetched from the devices one at a time."""
  check_table(table, state, "export")
  params = param_shapes(state)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  by_name = {k.torch: k for k in table}
  entries = [
      (k.torch, np_dtype, torch_shape(k.layout, params[k.ours].shape)) for k in by_name.values()
  ]

  def produce(name):
    k = by_name[name]
    return np.ascontiguousarray(to_torch(k.layout, _to_host(params[k.ours]))).astype(np_dtype)

  return entries, produce


# --------------------------------------------------------------------------- directories

CONFIG_FILE = "config.json"
DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(dtype: str) -> np.dtype:
  """The numpy dtype of a parameter dtype name; ValueError listing the valid names."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: must be one of {DTYPES}")
  return jax.numpy.dtype(dtype)


def read_config(directory: str, parse, what: str):
  """`parse(directory/config.json as a dict)`; CheckpointError naming the path otherwise."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: not a directory (expected a {what} checkpoint)")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{directory}: not a {what} checkpoint (no {CONFIG_FILE})")
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e
  try:
    return parse(d)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from e


def param_dtype(model: nnx.Module) -> str:
  """The dtype name of the model's parameters (the first one's)."""
  leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  return str(jax.numpy.dtype(leaves[0].dtype))


def save_directory(
    directory: str,
    model: nnx.Module,
    table: Sequence[Key],
    config_dict,
    *,
    weights_name: str,
    dtype: str | None,
    variant: str | None,
    max_shard_bytes: int,
    overwrite: bool,
) -> list[str]:
  """Write config.json (`config_dict(stored dtype name)`) and the safetensors of `model` by
  `table` (stored as `dtype`, default the parameters'); returns the files written. Refuses to
  replace an earlier checkpoint in `directory` unless `overwrite`."""
  out_dtype = dtype or param_dtype(model)
  check_dtype(out_dtype)
  single, index = weight_files(weights_name, variant)
  stem = single[: -len(".safetensors")]
  os.makedirs(directory, exist_ok=True)
  stale = [
      f
      for f in os.listdir(directory)
      if f in (single, index, CONFIG_FILE)
      or (f.startswith(stem + "-") and f.endswith(".safetensors"))
  ]
  if stale and not overwrite:
    raise FileExistsError(f"{directory}: already holds {sorted(stale)}; pass overwrite=True")
  for f in stale:
    os.remove(os.path.join(directory, f))
  entries, produce = torch_entries(nnx.state(model, nnx.Param), table, out_dtype)
  written = write_checkpoint(
      directory,
      entries,
      produce,
      max_shard_bytes=max_shard_bytes,
      weights_name=weights_name,
      variant=variant,
  )
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config_dict(out_dtype), f, indent=2, sort_keys=True)
  return [CONFIG_FILE] + written
