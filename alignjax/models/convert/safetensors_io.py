"""Read and write safetensors checkpoints one tensor at a time.

A checkpoint directory holds either `model.safetensors` or `model.safetensors.index.json`
({"metadata": {...}, "weight_map": {tensor name: shard file}}) plus the shards it names.

File layout: 8-byte little-endian header size n, n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
(offsets relative to the end of the header). Reading memory-maps each file, so a tensor is
read only when its bytes are touched (bfloat16 as jax's numpy dtype; numpy has none).
Writing streams tensors produced one at a time, splitting into shards of at most
`max_shard_bytes` (a single tensor larger than that gets a shard of its own).
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable

import jax.numpy as jnp
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def weight_files(weights_name: str = SINGLE_FILE, variant: str | None = None) -> tuple[str, str]:
  """(single file, index file) names of a checkpoint whose weights file is `weights_name`,
  with the naming transformers and diffusers use for a variant ("fp16", "bf16"):
  model.safetensors -> model.fp16.safetensors, model.safetensors.index.fp16.json."""
  if not weights_name.endswith(".safetensors"):
    raise ValueError(f"weights_name {weights_name!r}: must end with .safetensors")
  index = weights_name + ".index.json"
  if variant is None:
    return weights_name, index
  if not re.fullmatch(r"[A-Za-z0-9_]+", variant):
    raise ValueError(f"variant {variant!r}: expected a name such as 'fp16' or 'bf16'")
  stem = weights_name[: -len(".safetensors")]
  return f"{stem}.{variant}.safetensors", f"{weights_name}.index.{variant}.json"


_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be read as expected."""


class TensorInfo(tuple):
  """(file, dtype, shape)."""

  file = property(lambda self: self[0])
  dtype = property(lambda self: self[1])
  shape = property(lambda self: self[2])


def _read_header(path: str) -> tuple[dict, int]:
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  return header, 8 + n


class SafetensorsCheckpoint:
  """Tensor names, shapes and lazily read values of a (possibly sharded) checkpoint."""

  def __init__(self, directory: str, weights_name: str = SINGLE_FILE, variant: str | None = None):
    self.directory = directory
    single_name, index_name = weight_files(weights_name, variant)
    single, index = (os.path.join(directory, n) for n in (single_name, index_name))
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' mapping")
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      weight_map, files = None, [single_name]
    else:
      raise CheckpointError(
          f"{directory}: no {single_name} or {index_name} (only safetensors checkpoints are "
          f"supported; found {sorted(os.listdir(directory)) if os.path.isdir(directory) else []})"
      )
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise CheckpointError(
          f"{index}: shard file(s) {missing} listed in the index are missing " f"from {directory}"
      )
    self.tensors: dict[str, TensorInfo] = {}
    self._offsets: dict[str, tuple[int, int]] = {}
    self._maps: dict[str, np.memmap] = {}
    for name in files:
      path = os.path.join(directory, name)
      header, data_start = _read_header(path)
      header.pop("__metadata__", None)
      for key, info in header.items():
        if weight_map is not None and weight_map.get(key) != name:
          raise CheckpointError(f"{path}: tensor {key!r} is not listed for this file in {index}")
        if info.get("dtype") not in _DTYPES:
          raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')}")
        dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
          raise CheckpointError(
              f"{path}: tensor {key!r} data size {end - begin} does not match "
              f"shape {shape} and dtype {info['dtype']}"
          )
        self.tensors[key] = TensorInfo((name, dtype, shape))
        self._offsets[key] = (data_start + begin, data_start + end)
    if weight_map is not None:
      absent = sorted(set(weight_map) - set(self.tensors))
      if absent:
        raise CheckpointError(
            f"{index} lists tensor(s) {absent[:5]} (of {len(absent)}) that "
            f"their shard files do not contain"
        )

  def get(self, key: str) -> np.ndarray:
    """The tensor as a read-only memory-mapped numpy array."""
    info = self.tensors[key]
    if info.file not in self._maps:
      self._maps[info.file] = np.memmap(os.path.join(self.directory, info.file), np.uint8, "r")
    begin, end = self._offsets[key]
    return self._maps[info.file][begin:end].view(info.dtype).reshape(info.shape)


class InMemoryCheckpoint:
  """Named numpy arrays read like a `SafetensorsCheckpoint` (`tensors`, `get`, `directory`),
  e.g. a PyTorch module's state dict converted in a benchmark or test, without a file."""

  def __init__(self, arrays: dict, directory: str = "<memory>"):
    self.directory = directory
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.tensors = {
        k: TensorInfo((directory, a.dtype, tuple(a.shape))) for k, a in self._arrays.items()
    }

  def get(self, key: str) -> np.ndarray:
    return self._arrays[key]


def _header_bytes(entries: list[tuple[str, np.dtype, tuple]]) -> tuple[bytes, list[int]]:
  header, offset, sizes = {"__metadata__": {"format": "pt"}}, 0, []
  for key, dtype, shape in entries:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[key] = {
        "dtype": _NAMES[np.dtype(dtype)],
        "shape": list(shape),
        "data_offsets": [offset, offset + size],
    }
    offset += size
    sizes.append(size)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes
  return struct.pack("<Q", len(raw)) + raw, sizes


def write_checkpoint(
    directory: str,
    entries: list[tuple[str, np.dtype, tuple]],
    produce: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int,
    weights_name: str = SINGLE_FILE,
    variant: str | None = None,
) -> list[str]:
  """Write tensors `entries` = [(name, dtype, shape)], each made by `produce(name)` only when
  it is written; returns the files written (one file, or shards plus the index), named as
  `weight_files(weights_name, variant)` and, for shards, `<stem>[.variant]-00001-of-00002`."""
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be > 0")
  shards: list[list] = [[]]
  used = 0
  for entry in entries:
    size = int(np.prod(entry[2])) * np.dtype(entry[1]).itemsize
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(entry)
    used += size
  n = len(shards)
  single_name, index_name = weight_files(weights_name, variant)
  stem = single_name[: -len(".safetensors")]
  names = (
      [single_name] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  )
  os.makedirs(directory, exist_ok=True)
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    header, sizes = _header_bytes(shard)
    path = os.path.join(directory, name)
    with open(path + ".partial", "wb") as f:  # renamed once complete
      f.write(header)
      for (key, dtype, shape), size in zip(shard, sizes):
        arr = np.ascontiguousarray(produce(key))
        if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
          raise ValueError(
              f"write_checkpoint: {key} produced {arr.dtype}{arr.shape}, "
              f"declared {np.dtype(dtype)}{tuple(shape)}"
          )
        f.write(arr.tobytes())
        weight_map[key] = name
        total += size
    os.replace(path + ".partial", path)
  if n > 1:
    with open(os.path.join(directory, index_name), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    names.append(index_name)
  return names
