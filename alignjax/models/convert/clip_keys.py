"""transformers CLIP checkpoints <-> `alignjax.models.sd.clip`: key tables, loading, saving,
and CLIP's tokenizer.

A checkpoint directory holds config.json and `model.safetensors` (or a sharded
`model.safetensors.index.json`; a variant such as "fp16" names them `model.fp16.safetensors` /
`model.safetensors.index.fp16.json`). Tensor names are transformers' state-dict names:

    CLIPTextModel                   text_model.embeddings.token_embedding.weight, ...
                                    (transformers 4 and diffusers' Stable Diffusion
                                    checkpoints; transformers 5 writes them without the
                                    "text_model." prefix: both are read, the prefixed form is
                                    written, which transformers 4 and 5 both load)
    CLIPVisionModelWithProjection   vision_model.embeddings.patch_embedding.weight, ...,
                                    visual_projection.weight

`position_ids` buffers, present in older files, are ignored. A `CLIPModel` checkpoint (both
towers, model_type "clip") is refused with a message saying so: save the tower wanted with
transformers first. A `CLIPTextModelWithProjection` checkpoint (SDXL's second text encoder)
is refused too, as its text_projection.weight would be unused.

Loading builds the model abstractly (`nnx.eval_shape`, no memory), fills it one tensor at a
time through `torch_keys.load_state` (strict in both directions: missing, unused and
mis-shaped tensors are `CheckpointError`s naming them), then `nnx.merge`s. transformers and
torch are imported only by the tokenizer functions.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
from flax import nnx

from alignjax.models.convert import torch_keys
from alignjax.models.convert.safetensors_io import (
    SINGLE_FILE,
    SafetensorsCheckpoint,
)
from alignjax.models.convert.torch_keys import Key
from alignjax.models.sd.clip import CLIPTextModel, CLIPVisionModelWithProjection
from alignjax.models.sd.clip_config import CLIPTextConfig, CLIPVisionConfig

CONFIG_FILE = torch_keys.CONFIG_FILE
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TEXT_PREFIX = "text_model."
VISION_PREFIX = "vision_model."
TEXT_IGNORED = re.compile(r"(text_model\.)?embeddings\.position_ids")
VISION_IGNORED = re.compile(r"(vision_model\.)?embeddings\.position_ids")


def _norm(torch_name: str, ours: str) -> list[Key]:
  return [Key(f"{torch_name}.weight", f"{ours}/scale"), Key(f"{torch_name}.bias", f"{ours}/bias")]


def _linear(torch_name: str, ours: str, bias: bool = True) -> list[Key]:
  keys = [Key(f"{torch_name}.weight", f"{ours}/kernel", "linear")]
  return keys + ([Key(f"{torch_name}.bias", f"{ours}/bias")] if bias else [])


def _encoder(prefix: str, num_layers: int) -> list[Key]:
  keys = []
  for i in range(num_layers):
    t, o = f"{prefix}encoder.layers.{i}.", f"encoder/layers/{i}/"
    keys += _norm(t + "layer_norm1", o + "layer_norm1")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      keys += _linear(f"{t}self_attn.{proj}", f"{o}self_attn/{proj}")
    keys += _norm(t + "layer_norm2", o + "layer_norm2")
    keys += _linear(t + "mlp.fc1", o + "mlp/fc1") + _linear(t + "mlp.fc2", o + "mlp/fc2")
  return keys


def clip_text_key_table(config: CLIPTextConfig, prefix: str = TEXT_PREFIX) -> list[Key]:
  """Every parameter of `CLIPTextModel(config)` and its transformers tensor (prefix "" for the
  names transformers 5 writes)."""
  p = prefix
  return [
      Key(f"{p}embeddings.token_embedding.weight", "embeddings/token_embedding/embedding"),
      Key(f"{p}embeddings.position_embedding.weight", "embeddings/position_embedding/embedding"),
      *_encoder(p, config.num_hidden_layers),
      *_norm(f"{p}final_layer_norm", "final_layer_norm"),
  ]


def clip_vision_key_table(config: CLIPVisionConfig, prefix: str = VISION_PREFIX) -> list[Key]:
  """Every parameter of `CLIPVisionModelWithProjection(config)` and its transformers tensor."""
  p = prefix
  return [
      Key(f"{p}embeddings.class_embedding", "embeddings/class_embedding"),
      Key(f"{p}embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", "conv"),
      Key(f"{p}embeddings.position_embedding.weight", "embeddings/position_embedding/embedding"),
      *_norm(f"{p}pre_layrnorm", "pre_layrnorm"),
      *_encoder(p, config.num_hidden_layers),
      *_norm(f"{p}post_layernorm", "post_layernorm"),
      *_linear("visual_projection", "visual_projection", bias=False),
  ]


def read_clip_config(directory: str, kind: str) -> CLIPTextConfig | CLIPVisionConfig:
  """The tower config of directory/config.json; kind is "text" or "vision"."""
  cls = {"text": CLIPTextConfig, "vision": CLIPVisionConfig}[kind]
  return torch_keys.read_config(directory, cls.from_hf, f"CLIP {kind}")


def _load(directory, kind, model_cls, table_fn, prefix, ignored, *, variant, dtype, mesh, rules):
  config = read_clip_config(directory, kind)
  ckpt = SafetensorsCheckpoint(directory, variant=variant)
  names = set(ckpt.tensors)
  # transformers 5 writes a CLIPTextModel's tensors without the "text_model." prefix.
  if prefix == TEXT_PREFIX and not any(n.startswith(prefix) for n in names):
    if any(n.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") for n in names):
      prefix = ""
  table = table_fn(config, prefix)
  dt = torch_keys.check_dtype(dtype)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: model_cls(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
  )
  state = torch_keys.load_state(
      abstract,
      table,
      ckpt,
      what=model_cls.__name__,
      mesh=mesh,
      rules=rules,
      ignored=ignored,
  )
  return nnx.merge(graphdef, state), config


def load_clip_text(
    directory: str, *, variant: str | None = None, dtype: str = "float32", mesh=None, rules=None
) -> tuple[CLIPTextModel, CLIPTextConfig]:
  """`CLIPTextModel` from a transformers CLIPTextModel checkpoint directory (e.g. a Stable
  Diffusion checkpoint's text_encoder/), parameters and activations in `dtype`, placed by
  `parallel.spec_for(path, shape, mesh, rules)` (the default device when mesh is None)."""
  return _load(
      directory,
      "text",
      CLIPTextModel,
      clip_text_key_table,
      TEXT_PREFIX,
      TEXT_IGNORED,
      variant=variant,
      dtype=dtype,
      mesh=mesh,
      rules=rules,
  )


def load_clip_vision(
    directory: str, *, variant: str | None = None, dtype: str = "float32", mesh=None, rules=None
) -> tuple[CLIPVisionModelWithProjection, CLIPVisionConfig]:
  """`CLIPVisionModelWithProjection` from a transformers checkpoint of that class."""
  return _load(
      directory,
      "vision",
      CLIPVisionModelWithProjection,
      clip_vision_key_table,
      VISION_PREFIX,
      VISION_IGNORED,
      variant=variant,
      dtype=dtype,
      mesh=mesh,
      rules=rules,
  )


def _save(directory, model, table, *, dtype, variant, max_shard_bytes, overwrite) -> list[str]:
  return torch_keys.save_directory(
      directory,
      model,
      table,
      lambda out_dtype: model.config.to_hf(dtype=out_dtype),
      weights_name=SINGLE_FILE,
      dtype=dtype,
      variant=variant,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
  )


def save_clip_text(
    directory: str,
    model: CLIPTextModel,
    *,
    dtype: str | None = None,
    variant: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> list[str]:
  """Write config.json + safetensors that `transformers.CLIPTextModel.from_pretrained` loads;
  returns the files written. dtype: stored dtype (default the parameters')."""
  return _save(
      directory,
      model,
      clip_text_key_table(model.config),
      dtype=dtype,
      variant=variant,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
  )


def save_clip_vision(
    directory: str,
    model: CLIPVisionModelWithProjection,
    *,
    dtype: str | None = None,
    variant: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> list[str]:
  """Write a checkpoint `transformers.CLIPVisionModelWithProjection.from_pretrained` loads."""
  return _save(
      directory,
      model,
      clip_vision_key_table(model.config),
      dtype=dtype,
      variant=variant,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
  )


def load_clip_tokenizer(directory: str):
  """CLIP's BPE tokenizer from a local directory (vocab.json + merges.txt, e.g. a Stable
  Diffusion checkpoint's tokenizer/); never downloads. Needs transformers (optional)."""
  has_vocab = all(os.path.exists(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt"))
  has_fast = os.path.exists(os.path.join(directory, "tokenizer.json"))
  if not (has_vocab or has_fast):
    raise FileNotFoundError(
        f"{directory}: no CLIP tokenizer files (expected vocab.json + merges.txt or "
        "tokenizer.json)"
    )
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "load_clip_tokenizer needs the `transformers` and `tokenizers` packages "
        "(pip install transformers tokenizers)"
    ) from e
  if os.path.exists(os.path.join(directory, "tokenizer_config.json")):
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  return transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize_prompts(
    tokenizer, prompts: str | Sequence[str], max_length: int | None = None
) -> np.ndarray:
  """int32 [B, max_length] token ids as `StableDiffusionPipeline` makes them: bos, tokens, eos,
  truncated to max_length (default the tokenizer's model_max_length, 77 for SD) and padded to
  it with the pad token ("max_length" padding, right side)."""
  if isinstance(prompts, str):
    prompts = [prompts]
  length = tokenizer.model_max_length if max_length is None else max_length
  if not isinstance(length, int) or length < 2 or length > 1_000_000:
    raise ValueError(
        f"tokenize_prompts: max_length={length!r} must be an integer in [2, 10^6] (pass it when "
        "the tokenizer has no model_max_length)"
    )
  enc = tokenizer(
      list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="np"
  )
  return np.asarray(enc["input_ids"], np.int32)
