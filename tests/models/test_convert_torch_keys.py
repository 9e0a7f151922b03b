"""torch_keys: layouts against PyTorch's own modules, and strict loading."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from alignjax.models.convert import torch_keys
from alignjax.models.convert.safetensors_io import (
    CheckpointError,
    SafetensorsCheckpoint,
    write_checkpoint,
)
from alignjax.models.convert.torch_keys import Key


def test_layouts_reproduce_torch_linear_and_conv():
  torch.manual_seed(0)
  lin, conv, one = (
      torch.nn.Linear(5, 3),
      torch.nn.Conv2d(4, 6, 3, padding=1),
      torch.nn.Conv2d(4, 2, 1),
  )
  x = np.random.default_rng(0).normal(size=(2, 7, 7, 4)).astype(np.float32)
  w = {
      n: p.detach().numpy()
      for n, p in [("lin", lin.weight), ("conv", conv.weight), ("one", one.weight)]
  }
  ours = torch_keys.to_ours("linear", w["lin"])
  v = x[0, 0, :5, 0]
  np.testing.assert_allclose(v @ ours, lin.weight.detach().numpy() @ v, rtol=1e-6)
  k = torch_keys.to_ours("conv", w["conv"])
  got = jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  want = torch.nn.functional.conv2d(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), conv.weight, padding=1
  )
  np.testing.assert_allclose(
      np.asarray(got), want.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5
  )
  k1 = torch_keys.to_ours("conv1x1", w["one"])
  want1 = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), one.weight)
  np.testing.assert_allclose(x @ k1, want1.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
  for layout, a in [
      ("linear", w["lin"]),
      ("conv", w["conv"]),
      ("conv1x1", w["one"]),
      ("same", w["lin"]),
  ]:
    o = torch_keys.to_ours(layout, a)
    assert torch_keys.torch_shape(layout, o.shape) == a.shape
    np.testing.assert_array_equal(torch_keys.to_torch(layout, o), a)
  with pytest.raises(ValueError, match="layout 'dense' is not one of"):
    Key("w", "w", "dense")


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    self.proj = nnx.Linear(5, 3, rngs=rngs)
    self.conv = nnx.Conv(4, 6, (3, 3), rngs=rngs)


TABLE = [
    Key("proj.weight", "proj/kernel", "linear"),
    Key("proj.bias", "proj/bias"),
    Key("conv.weight", "conv/kernel", "conv"),
    Key("conv.bias", "conv/bias"),
]


def _torch_state(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "proj.weight": rng.normal(size=(3, 5)).astype(np.float32),
      "proj.bias": rng.normal(size=(3,)).astype(np.float32),
      "conv.weight": rng.normal(size=(6, 4, 3, 3)).astype(np.float32),
      "conv.bias": rng.normal(size=(6,)).astype(np.float32),
  }


def test_load_state_fills_every_parameter_and_exports_back(tmp_path):
  tensors = _torch_state()
  save_file({**tensors, "pos_ids": np.arange(3)}, str(tmp_path / "model.safetensors"))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
  state = torch_keys.load_state(
      abstract,
      TABLE,
      SafetensorsCheckpoint(str(tmp_path)),
      what="tiny",
      ignored=re.compile("pos_ids"),
  )
  model = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(model.proj.kernel.get_value(), tensors["proj.weight"].T)
  np.testing.assert_array_equal(
      model.conv.kernel.get_value(), tensors["conv.weight"].transpose(2, 3, 1, 0)
  )
  entries, produce = torch_keys.torch_entries(nnx.state(model), TABLE, "float16")
  write_checkpoint(str(tmp_path / "out"), entries, produce, max_shard_bytes=2**20)
  back = SafetensorsCheckpoint(str(tmp_path / "out"))
  for name, value in tensors.items():
    assert back.get(name).dtype == np.float16
    np.testing.assert_array_equal(back.get(name), value.astype(np.float16))


def test_load_state_on_a_mesh_shards_parameters(tmp_path):
  save_file(_torch_state(), str(tmp_path / "model.safetensors"))
  mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
  _, abstract = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
  state = torch_keys.load_state(
      abstract,
      TABLE,
      SafetensorsCheckpoint(str(tmp_path)),
      what="tiny",
      mesh=mesh,
      rules=[("conv/kernel", (None, None, None, "fsdp"))] if 6 % len(jax.devices()) == 0 else [],
  )
  kernel = state["conv"]["kernel"].get_value()
  assert kernel.sharding.mesh == mesh and kernel.dtype == jnp.float32


def test_strict_checks_name_the_tensor(tmp_path):
  _, abstract = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
  bad = _torch_state()
  del bad["conv.bias"]
  save_file({**bad, "extra.weight": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(
      CheckpointError, match=r"lacks 1 tensor\(s\) its config needs: \['conv.bias'\]"
  ):
    torch_keys.load_state(abstract, TABLE, SafetensorsCheckpoint(str(tmp_path)), what="tiny")
  bad = _torch_state()
  save_file({**bad, "extra.weight": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"does not use: \['extra.weight'\]"):
    torch_keys.load_state(abstract, TABLE, SafetensorsCheckpoint(str(tmp_path)), what="tiny")
  bad["proj.weight"] = bad["proj.weight"].T.copy()
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"'proj.weight' has shape \(5, 3\), expected \(3, 5\)"):
    torch_keys.load_state(abstract, TABLE, SafetensorsCheckpoint(str(tmp_path)), what="tiny")
  with pytest.raises(AssertionError, match="unmatched \\['conv/bias'\\]"):
    torch_keys.check_table(TABLE[:3], abstract, "tiny")
