"""alignjax's streaming safetensors reader/writer against the safetensors package."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from alignjax.models.convert.safetensors_io import (
    CheckpointError,
    SafetensorsCheckpoint,
    write_checkpoint,
)


def test_reader_matches_safetensors_package(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
      "a": rng.normal(size=(3, 5)).astype(np.float32),
      "b": np.arange(7, dtype=np.int64),
      "c": rng.normal(size=(2, 2, 2)).astype(np.float16),
  }
  save_file(arrays, str(tmp_path / "model.safetensors"))
  ckpt = SafetensorsCheckpoint(str(tmp_path))
  assert {k: tuple(v.shape) for k, v in ckpt.tensors.items()} == {
      k: v.shape for k, v in arrays.items()
  }
  for k, v in arrays.items():
    assert ckpt.get(k).dtype == v.dtype
    np.testing.assert_array_equal(ckpt.get(k), v)


def test_reader_reads_bfloat16(tmp_path):
  x = torch.randn(4, 6).to(torch.bfloat16)
  save_torch({"w": x}, str(tmp_path / "model.safetensors"))
  got = SafetensorsCheckpoint(str(tmp_path)).get("w")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), x.float().numpy())


def test_writer_shards_and_index_read_back_by_safetensors(tmp_path):
  rng = np.random.default_rng(1)
  arrays = {f"t{i}": rng.normal(size=(10, 10)).astype(np.float32) for i in range(5)}
  arrays["big"] = rng.normal(size=(40, 10)).astype(np.float32)  # larger than a shard
  produced = []

  def produce(k):
    produced.append(k)
    return arrays[k]

  entries = [(k, v.dtype, v.shape) for k, v in arrays.items()]
  files = write_checkpoint(str(tmp_path), entries, produce, max_shard_bytes=1000)
  assert produced == list(arrays)  # each tensor made once, in order
  # 400-byte tensors, 1000-byte shards: [t0, t1], [t2, t3], [t4], [big]
  assert files[:-1] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
  with open(tmp_path / files[-1]) as f:
    index = json.load(f)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in arrays.values())
  assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"
  for k, v in arrays.items():
    with safe_open(str(tmp_path / index["weight_map"][k]), "np") as f:
      np.testing.assert_array_equal(f.get_tensor(k), v)
  ckpt = SafetensorsCheckpoint(str(tmp_path))
  np.testing.assert_array_equal(ckpt.get("t3"), arrays["t3"])

  with pytest.raises(ValueError, match="t0 produced float32\\(10, 10\\), declared"):
    write_checkpoint(str(tmp_path / "x"), [("t0", np.float32, (5,))], produce, max_shard_bytes=1000)


def test_bad_files_are_named(tmp_path):
  with open(tmp_path / "model.safetensors", "wb") as f:
    f.write(b"\x05\x00")
  with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
    SafetensorsCheckpoint(str(tmp_path))
  os.remove(tmp_path / "model.safetensors")
  save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "s1.safetensors"))
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}, f)
  with pytest.raises(CheckpointError, match=r"lists tensor\(s\) \['b'\]"):
    SafetensorsCheckpoint(str(tmp_path))
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"a": "s2.safetensors"}}, f)
  with pytest.raises(CheckpointError, match=r"shard file\(s\) \['s2.safetensors'\]"):
    SafetensorsCheckpoint(str(tmp_path))


def test_variant_names_follow_transformers_and_diffusers(tmp_path):
  from alignjax.models.convert.safetensors_io import DIFFUSERS_WEIGHTS, weight_files

  assert weight_files() == ("model.safetensors", "model.safetensors.index.json")
  assert weight_files(DIFFUSERS_WEIGHTS, "fp16") == (
      "diffusion_pytorch_model.fp16.safetensors",
      "diffusion_pytorch_model.safetensors.index.fp16.json",
  )
  with pytest.raises(ValueError, match="must end with .safetensors"):
    weight_files("model.bin")
  with pytest.raises(ValueError, match="variant 'fp 16'"):
    weight_files(variant="fp 16")
  arrays = {f"t{i}": np.full((10, 10), i, np.float16) for i in range(3)}
  entries = [(k, v.dtype, v.shape) for k, v in arrays.items()]
  files = write_checkpoint(
      str(tmp_path),
      entries,
      arrays.__getitem__,
      max_shard_bytes=250,
      weights_name=DIFFUSERS_WEIGHTS,
      variant="fp16",
  )
  assert files == [
      "diffusion_pytorch_model.fp16-00001-of-00003.safetensors",
      "diffusion_pytorch_model.fp16-00002-of-00003.safetensors",
      "diffusion_pytorch_model.fp16-00003-of-00003.safetensors",
      "diffusion_pytorch_model.safetensors.index.fp16.json",
  ]
  ckpt = SafetensorsCheckpoint(str(tmp_path), DIFFUSERS_WEIGHTS, variant="fp16")
  np.testing.assert_array_equal(ckpt.get("t2"), arrays["t2"])
  with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors or"):
    SafetensorsCheckpoint(str(tmp_path), DIFFUSERS_WEIGHTS)


def test_in_memory_checkpoint_reads_like_the_file_it_stands_for(tmp_path):
  from alignjax.models.convert.safetensors_io import InMemoryCheckpoint, SafetensorsCheckpoint  # pylint: disable=import-outside-toplevel

  arrays = {
      "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
      "b.bias": np.array([1, -2], np.int64),
  }
  save_file(arrays, str(tmp_path / "model.safetensors"))
  on_disk = SafetensorsCheckpoint(str(tmp_path))
  in_memory = InMemoryCheckpoint(arrays)
  assert in_memory.directory == "<memory>"
  assert {k: (i.dtype, i.shape) for k, i in in_memory.tensors.items()} == {
      k: (i.dtype, i.shape) for k, i in on_disk.tensors.items()
  }
  for key in arrays:
    np.testing.assert_array_equal(in_memory.get(key), on_disk.get(key))
