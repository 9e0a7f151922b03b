"""Model I/O: a directory with config.json + model.safetensors, loaded with strict checks.

Layout written by `save_model(directory, model, config)`:

    directory/config.json        {"model_type": "<name>", <every config field>}
    directory/model.safetensors  one tensor per parameter, keyed by the '.'-joined state path
                                 (e.g. "down.0.conv1.kernel")

`load_model(directory, model_cls, config_cls)` rebuilds the config (unknown fields refused),
builds the model abstractly (`nnx.eval_shape`, no initialisation cost), and fills every
parameter from the file. Every parameter must be present, every tensor must be used, and
shapes and dtypes must match exactly; otherwise a `ModelIOError` names the file and the key.

The config helpers `config_to_dict` / `config_from_dict` turn a config dataclass into a JSON
mapping and back; tuple-typed fields round-trip through JSON lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from alignjax.parallel import path_str

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ModelIOError(ValueError):
  """A model directory is missing, incomplete or does not match the model."""


# ---------------------------------------------------------------------------------------------
# Config dataclasses <-> JSON mappings.


def config_to_dict(config) -> dict[str, Any]:
  """Dataclass config -> JSON-ready dict (tuples become lists)."""
  if not dataclasses.is_dataclass(config) or isinstance(config, type):
    raise TypeError(f"config_to_dict: expected a dataclass instance, got {type(config).__name__}")
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    out[f.name] = list(value) if isinstance(value, tuple) else value
  return out


def config_from_dict(config_cls, d: Mapping[str, Any], *, source: str = ""):
  """JSON mapping -> `config_cls` instance; unknown fields raise naming all of them."""
  if not isinstance(d, Mapping):
    raise TypeError(f"{config_cls.__name__}.from_dict: expected a mapping, got {type(d).__name__}")
  fields = {f.name: f for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(d) - set(fields))
  where = f" in {source}" if source else ""
  if unknown:
    raise ModelIOError(
        f"{config_cls.__name__}: unknown config field(s){where}: {unknown}; "
        f"valid fields: {sorted(fields)}"
    )
  hints = typing.get_type_hints(config_cls)
  kwargs = {}
  for name, value in d.items():
    hint = hints.get(name)
    origin = typing.get_origin(hint)
    if (hint is tuple or origin is tuple) and isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  return config_cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Parameter flattening.


def flatten_state(state) -> dict[str, Any]:
  """nnx State -> {'.'-joined path: array}."""
  return {
      path_str(path, sep="."): v.get_value() if isinstance(v, nnx.Variable) else v
      for path, v in nnx.to_flat_state(state)
  }


def model_type_of(model_cls) -> str:
  """The "model_type" string stored in config.json: the class's MODEL_TYPE or its name."""
  return getattr(model_cls, "MODEL_TYPE", model_cls.__name__)


def save_model(directory: str | os.PathLike, model: nnx.Module, config) -> None:
  """Writes directory/config.json and directory/model.safetensors (all of `nnx.state(model)`)."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  cfg = {"model_type": model_type_of(type(model))}
  fields = config_to_dict(config)
  if "model_type" in fields:
    raise ModelIOError(f"save_model: config field name 'model_type' is reserved ({directory})")
  cfg.update(fields)
  tensors = {k: np.asarray(jax.device_get(v)) for k, v in flatten_state(nnx.state(model)).items()}
  tmp_weights = os.path.join(directory, WEIGHTS_NAME + ".tmp")
  save_file(tensors, tmp_weights, metadata={"format": "alignjax", "model_type": cfg["model_type"]})
  os.replace(tmp_weights, os.path.join(directory, WEIGHTS_NAME))
  tmp_config = os.path.join(directory, CONFIG_NAME + ".tmp")
  with open(tmp_config, "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  os.replace(tmp_config, os.path.join(directory, CONFIG_NAME))


def read_config(directory: str | os.PathLike, config_cls, model_cls=None):
  """Reads directory/config.json into `config_cls`; checks model_type against `model_cls`."""
  directory = os.fspath(directory)
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isdir(directory):
    raise ModelIOError(f"model directory not found: {directory}")
  if not os.path.isfile(path):
    raise ModelIOError(f"no {CONFIG_NAME} in model directory {directory} (expected {path})")
  with open(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ModelIOError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(raw, dict) or "model_type" not in raw:
    raise ModelIOError(f"{path}: expected a JSON object with a 'model_type' entry")
  raw = dict(raw)
  model_type = raw.pop("model_type")
  if model_cls is not None and model_type != model_type_of(model_cls):
    raise ModelIOError(
        f"{path}: model_type {model_type!r} does not match {model_cls.__name__} "
        f"(expected {model_type_of(model_cls)!r})"
    )
  return config_from_dict(config_cls, raw, source=path)


def load_model(directory: str | os.PathLike, model_cls, config_cls, *, shardings=None):
  """Builds `model_cls(config, rngs=...)` from directory/config.json and fills its state.

  Args:
    directory: a directory written by `save_model`.
    model_cls: the NNX module class, constructed as `model_cls(config, rngs=nnx.Rngs(0))`.
    config_cls: the config dataclass (unknown fields in config.json are refused).
    shardings: optional pytree with the structure of `nnx.state(model)` whose leaves are
      `jax.sharding.Sharding`s; each loaded array is `jax.device_put` onto its sharding.

  Returns:
    the model (its config is `model.config`).
  """
  directory = os.fspath(directory)
  config = read_config(directory, config_cls, model_cls)
  weights = os.path.join(directory, WEIGHTS_NAME)
  if not os.path.isfile(weights):
    raise ModelIOError(f"no {WEIGHTS_NAME} in model directory {directory} (expected {weights})")

  abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat_abstract = nnx.to_flat_state(abstract_state)
  expected = {path_str(path, sep="."): var for path, var in flat_abstract}

  sharding_leaves = None
  if shardings is not None:  # a State of Variables holding Shardings, or nested dicts
    flat, _ = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
    )
    sharding_leaves = {path_str(p, sep="."): s for p, s in flat}
    missing_sh = sorted(set(expected) - set(sharding_leaves))
    if missing_sh:
      raise ModelIOError(f"load_model({directory}): shardings lack entries for {missing_sh}")

  with safe_open(weights, framework="numpy") as f:
    present = set(f.keys())
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
      raise ModelIOError(f"{weights}: missing parameter(s) {missing} for {model_cls.__name__}")
    if unexpected:
      raise ModelIOError(
          f"{weights}: unexpected key(s) {unexpected} (not parameters of " f"{model_cls.__name__})"
      )
    values = {}
    for key, var in expected.items():
      want = var.get_value()
      array = f.get_tensor(key)
      if tuple(array.shape) != tuple(want.shape):
        raise ModelIOError(
            f"{weights}: key {key!r} has shape {tuple(array.shape)}, the model "
            f"expects {tuple(want.shape)}"
        )
      if np.dtype(array.dtype) != np.dtype(want.dtype):
        raise ModelIOError(
            f"{weights}: key {key!r} has dtype {array.dtype}, the model expects "
            f"{np.dtype(want.dtype)}"
        )
      if sharding_leaves is not None:
        values[key] = jax.device_put(array, sharding_leaves[key])
      else:
        values[key] = jax.numpy.asarray(array)

  filled = [(path, var.replace(values[path_str(path, sep=".")])) for path, var in flat_abstract]
  state = nnx.from_flat_state(filled)
  return nnx.merge(graphdef, state)
