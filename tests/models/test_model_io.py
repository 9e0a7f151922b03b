"""Tests of model directory I/O (alignjax.models.io)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from alignjax import testing
from alignjax.models import io
from alignjax.models.classifier import ClassifierConfig, DigitsClassifier
from alignjax.models.unet import UNet, UNetConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("unet"))
  model = testing.tiny_unet(seed=3)
  io.save_model(directory, model, model.config)
  return directory, model


def _copy(src, dst):
  os.makedirs(dst, exist_ok=True)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  return dst


def test_round_trip_is_exact(saved):
  directory, model = saved
  with open(os.path.join(directory, io.CONFIG_NAME)) as f:
    cfg = json.load(f)
  assert cfg["model_type"] == "alignjax_unet" and cfg["channels"] == [8]
  tensors = load_file(os.path.join(directory, io.WEIGHTS_NAME))
  assert "down.0.conv1.kernel" in tensors and "class_embed.embedding" in tensors
  loaded = io.load_model(directory, UNet, UNetConfig)
  assert loaded.config == model.config
  a, b = nnx.state(model), nnx.state(loaded)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert len(tensors) == len(jax.tree.leaves(a))


def test_classifier_round_trip(tmp_path):
  model = testing.tiny_classifier(seed=1)
  io.save_model(tmp_path, model, model.config)
  loaded = io.load_model(tmp_path, DigitsClassifier, ClassifierConfig)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 1)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(loaded(x)))


def test_missing_directory_config_or_weights(tmp_path, saved):
  with pytest.raises(io.ModelIOError, match="model directory not found.*nope"):
    io.load_model(tmp_path / "nope", UNet, UNetConfig)
  with pytest.raises(io.ModelIOError, match=r"no config.json in model directory"):
    io.load_model(tmp_path, UNet, UNetConfig)
  d = _copy(saved[0], str(tmp_path / "noweights"))
  os.remove(os.path.join(d, io.WEIGHTS_NAME))
  with pytest.raises(io.ModelIOError, match=r"no model.safetensors in model directory.*noweights"):
    io.load_model(d, UNet, UNetConfig)


def test_config_errors(tmp_path, saved):
  d = _copy(saved[0], str(tmp_path / "cfg"))
  path = os.path.join(d, io.CONFIG_NAME)
  with open(path) as f:
    cfg = json.load(f)
  with open(path, "w") as f:
    json.dump({**cfg, "dropout": 0.1}, f)
  with pytest.raises(io.ModelIOError, match=r"unknown config field.*config.json.*\['dropout'\]"):
    io.load_model(d, UNet, UNetConfig)
  with open(path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(io.ModelIOError, match="model_type 'alignjax_unet' does not match"):
    io.load_model(d, DigitsClassifier, ClassifierConfig)
  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(io.ModelIOError, match="not valid JSON"):
    io.load_model(d, UNet, UNetConfig)


def _edit_weights(src, dst, edit):
  d = _copy(src, dst)
  path = os.path.join(d, io.WEIGHTS_NAME)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)
  return d, path


def test_weight_key_shape_dtype_errors(tmp_path, saved):
  src = saved[0]
  d, path = _edit_weights(src, str(tmp_path / "m"), lambda t: t.pop("conv_in.kernel"))
  with pytest.raises(io.ModelIOError, match=r"model.safetensors: missing.*'conv_in.kernel'"):
    io.load_model(d, UNet, UNetConfig)
  d, path = _edit_weights(
      src, str(tmp_path / "u"), lambda t: t.update({"extra.kernel": np.zeros(2, np.float32)})
  )
  with pytest.raises(io.ModelIOError, match=r"model.safetensors: unexpected.*'extra.kernel'"):
    io.load_model(d, UNet, UNetConfig)
  d, path = _edit_weights(
      src, str(tmp_path / "s"), lambda t: t.update({"conv_out.bias": np.zeros(3, np.float32)})
  )
  with pytest.raises(io.ModelIOError, match=r"key 'conv_out.bias' has shape \(3,\).*\(1,\)"):
    io.load_model(d, UNet, UNetConfig)
  d, path = _edit_weights(
      src, str(tmp_path / "t"), lambda t: t.update({"conv_out.bias": np.zeros(1, np.float16)})
  )
  with pytest.raises(io.ModelIOError, match=r"key 'conv_out.bias' has dtype float16.*float32"):
    io.load_model(d, UNet, UNetConfig)


def test_load_into_shardings(saved):
  directory, model = saved
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
  abstract = nnx.state(nnx.eval_shape(lambda: UNet(model.config, rngs=nnx.Rngs(0))))

  def spec(x):  # shard the output dimension of kernels whose width is a multiple of 8
    if x.ndim >= 2 and x.shape[-1] % 8 == 0:
      return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "data"))
    return NamedSharding(mesh, P())

  shardings = jax.tree.map(spec, abstract)
  loaded = io.load_model(directory, UNet, UNetConfig, shardings=shardings)
  kernel = loaded.down[0].conv1.kernel[...]
  assert kernel.sharding == NamedSharding(mesh, P(None, None, None, "data"))
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.down[0].conv1.kernel[...]))
  with pytest.raises(io.ModelIOError, match="shardings lack entries"):
    io.load_model(
        directory,
        UNet,
        UNetConfig,
        shardings={"conv_in": {"kernel": spec(jnp.zeros((3, 3, 1, 8)))}},
    )
