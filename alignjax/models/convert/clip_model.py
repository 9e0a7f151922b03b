"""transformers `CLIPModel` checkpoints (both towers) -> `alignjax.models.sd.clip_dual.CLIPModel`.

A CLIPModel checkpoint directory (e.g. openai/clip-vit-large-patch14, PickScore_v1) holds a
config.json with model_type "clip", `text_config` and `vision_config`, and `model.safetensors`
(or a sharded index; a variant such as "fp16" names them `model.fp16.safetensors`). Its
tensors are

    text_model.*          the text tower (clip_keys.clip_text_key_table, prefix "text_model.")
    vision_model.*        the vision tower (clip_keys.clip_vision_key_table, "vision_model.")
    visual_projection.weight, text_projection.weight   (nn.Linear without bias, [out, in])
    logit_scale           a scalar (log of the logit scale)

The key table is the two towers' tables with our paths moved under `text_model/` and
`vision_model/`, plus the text projection and the logit scale. `position_ids` buffers of older
files are ignored. Loading goes through `torch_keys.load_state`: strict in both directions
(a missing, unused or mis-shaped tensor is a `CheckpointError` naming the file and tensor).
Only safetensors are read (no torch import).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from alignjax.models.convert import torch_keys
from alignjax.models.convert.clip_keys import (
    TEXT_PREFIX,
    VISION_PREFIX,
    clip_text_key_table,
    clip_vision_key_table,
)
from alignjax.models.convert.safetensors_io import SafetensorsCheckpoint
from alignjax.models.convert.torch_keys import Key
from alignjax.models.sd.clip_dual import CLIPModel, CLIPModelConfig

__all__ = ["clip_model_key_table", "load_clip_model", "read_clip_model_config"]

IGNORED = re.compile(r"(text_model|vision_model)\.embeddings\.position_ids")


def clip_model_key_table(config: CLIPModelConfig) -> list[Key]:
  """Every parameter of `CLIPModel(config)` and its transformers CLIPModel tensor."""
  text = [
      Key(k.torch, f"text_model/{k.ours}", k.layout)
      for k in clip_text_key_table(config.text, TEXT_PREFIX)
  ]
  vision = [
      Key(k.torch, f"vision_model/{k.ours}", k.layout)
      for k in clip_vision_key_table(config.vision, VISION_PREFIX)
  ]
  return [
      *text,
      *vision,
      Key("text_projection.weight", "text_projection/kernel", "linear"),
      Key("logit_scale", "logit_scale"),
  ]


def read_clip_model_config(directory: str) -> CLIPModelConfig:
  """The `CLIPModelConfig` of directory/config.json (CheckpointError naming the file)."""
  return torch_keys.read_config(directory, CLIPModelConfig.from_hf, "CLIPModel")


def load_clip_model(
    directory: str, *, variant: str | None = None, dtype: str = "float32", mesh=None, rules=None
) -> tuple[CLIPModel, CLIPModelConfig]:
  """`CLIPModel` from a transformers CLIPModel checkpoint directory, parameters and activations
  in `dtype`, placed by `parallel.spec_for(path, shape, mesh, rules)` (the default device when
  mesh is None)."""
  torch_keys.check_dtype(dtype)
  config = read_clip_model_config(directory)
  ckpt = SafetensorsCheckpoint(directory, variant=variant)
  dt = jnp.dtype(dtype)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: CLIPModel(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
  )
  state = torch_keys.load_state(
      abstract,
      clip_model_key_table(config),
      ckpt,
      what="CLIPModel",
      mesh=mesh,
      rules=rules,
      ignored=IGNORED,
  )
  return nnx.merge(graphdef, state), config
