"""diffusers UNet2DConditionModel checkpoints <-> `alignjax.models.sd.unet`: key table, loading,
saving (plus the directory helpers `vae_keys` shares).

A checkpoint directory (a pipeline's unet/) holds config.json and
`diffusion_pytorch_model.safetensors` (or a sharded
`diffusion_pytorch_model.safetensors.index.json`; a variant such as "fp16" names them
`diffusion_pytorch_model.fp16.safetensors` / `...safetensors.index.fp16.json`). Tensor names
are diffusers' state-dict names; our parameter paths are the same module names joined by "/",
with torch's `weight` -> `kernel` (linear / conv) or `scale` (norms):

    down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight
        <-> down_blocks/0/attentions/1/transformer_blocks/0/attn1/to_q/kernel   (linear)

1x1 convolutions (resnets' conv_shortcut, Transformer2DModel's proj_in / proj_out when
use_linear_projection is false) are Dense layers on our side (`torch_keys` layout conv1x1).
Loading builds the model abstractly (`nnx.eval_shape`), fills it one tensor at a time
(`torch_keys.load_state`, strict both ways: missing, unused and mis-shaped tensors are
`CheckpointError`s naming them) and `nnx.merge`s. torch is never imported.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

from alignjax.models.convert import torch_keys
from alignjax.models.convert.safetensors_io import (
    DIFFUSERS_WEIGHTS,
    SafetensorsCheckpoint,
)
from alignjax.models.convert.torch_keys import Key
from alignjax.models.sd.unet import UNet2DConditionModel, UNetConfig

CONFIG_FILE = torch_keys.CONFIG_FILE
DEFAULT_MAX_SHARD_BYTES = 10 * 2**30  # diffusers' default max_shard_size "10GB"
DTYPES = torch_keys.DTYPES


# --- key-table pieces (shared with vae_keys) ------------------------------------------------


def conv(t: str, o: str) -> list[Key]:
  return [Key(f"{t}.weight", f"{o}/kernel", "conv"), Key(f"{t}.bias", f"{o}/bias")]


def conv1x1(t: str, o: str) -> list[Key]:
  return [Key(f"{t}.weight", f"{o}/kernel", "conv1x1"), Key(f"{t}.bias", f"{o}/bias")]


def linear(t: str, o: str, bias: bool = True) -> list[Key]:
  return [Key(f"{t}.weight", f"{o}/kernel", "linear")] + (
      [Key(f"{t}.bias", f"{o}/bias")] if bias else []
  )


def norm(t: str, o: str) -> list[Key]:
  return [Key(f"{t}.weight", f"{o}/scale"), Key(f"{t}.bias", f"{o}/bias")]


def resnet(t: str, o: str, cin: int, cout: int, temb: bool) -> list[Key]:
  keys = norm(f"{t}.norm1", f"{o}/norm1") + conv(f"{t}.conv1", f"{o}/conv1")
  keys += linear(f"{t}.time_emb_proj", f"{o}/time_emb_proj") if temb else []
  keys += norm(f"{t}.norm2", f"{o}/norm2") + conv(f"{t}.conv2", f"{o}/conv2")
  return keys + (conv1x1(f"{t}.conv_shortcut", f"{o}/conv_shortcut") if cin != cout else [])


def _attention(t: str, o: str, bias: bool = False) -> list[Key]:
  keys = []
  for p in ("to_q", "to_k", "to_v"):
    keys += linear(f"{t}.{p}", f"{o}/{p}", bias=bias)
  return keys + linear(f"{t}.to_out.0", f"{o}/to_out/0")


def vae_attention(t: str, o: str) -> list[Key]:
  return norm(f"{t}.group_norm", f"{o}/group_norm") + _attention(t, o, bias=True)


def transformer(t: str, o: str, use_linear_projection: bool) -> list[Key]:
  proj = linear if use_linear_projection else conv1x1
  keys = norm(f"{t}.norm", f"{o}/norm") + proj(f"{t}.proj_in", f"{o}/proj_in")
  b, ob = f"{t}.transformer_blocks.0", f"{o}/transformer_blocks/0"
  for j in (1, 2):
    keys += norm(f"{b}.norm{j}", f"{ob}/norm{j}") + _attention(f"{b}.attn{j}", f"{ob}/attn{j}")
  keys += norm(f"{b}.norm3", f"{ob}/norm3")
  keys += linear(f"{b}.ff.net.0.proj", f"{ob}/ff/net/0/proj")
  keys += linear(f"{b}.ff.net.2", f"{ob}/ff/net/2")
  return keys + proj(f"{t}.proj_out", f"{o}/proj_out")


def unet_key_table(config: UNetConfig) -> list[Key]:
  """Every parameter of `UNet2DConditionModel(config)` and its diffusers tensor."""
  c = config
  keys = conv("conv_in", "conv_in")
  keys += linear("time_embedding.linear_1", "time_embedding/linear_1")
  keys += linear("time_embedding.linear_2", "time_embedding/linear_2")
  for i, s in enumerate(c.down_specs()):
    t, o = f"down_blocks.{i}", f"down_blocks/{i}"
    for j in range(s["num_layers"]):
      cin = s["cin"] if j == 0 else s["cout"]
      keys += resnet(f"{t}.resnets.{j}", f"{o}/resnets/{j}", cin, s["cout"], True)
      if s["attn"] is not None:
        keys += transformer(f"{t}.attentions.{j}", f"{o}/attentions/{j}", c.use_linear_projection)
    if s["add_downsample"]:
      keys += conv(f"{t}.downsamplers.0.conv", f"{o}/downsamplers/0/conv")
  ch = c.block_out_channels[-1]
  for j in (0, 1):
    keys += resnet(f"mid_block.resnets.{j}", f"mid_block/resnets/{j}", ch, ch, True)
  keys += transformer("mid_block.attentions.0", "mid_block/attentions/0", c.use_linear_projection)
  for i, s in enumerate(c.up_specs()):
    t, o = f"up_blocks.{i}", f"up_blocks/{i}"
    for j, cin in enumerate(s["resnet_in"]):
      keys += resnet(f"{t}.resnets.{j}", f"{o}/resnets/{j}", cin, s["cout"], True)
      if s["attn"] is not None:
        keys += transformer(f"{t}.attentions.{j}", f"{o}/attentions/{j}", c.use_linear_projection)
    if s["add_upsample"]:
      keys += conv(f"{t}.upsamplers.0.conv", f"{o}/upsamplers/0/conv")
  keys += norm("conv_norm_out", "conv_norm_out") + conv("conv_out", "conv_out")
  return keys


# --- directories (shared with vae_keys) -----------------------------------------------------


def read_config(directory: str, from_diffusers: Callable, what: str):
  """`from_diffusers(directory/config.json)`; CheckpointError naming the path otherwise."""
  return torch_keys.read_config(directory, from_diffusers, f"diffusers {what}")


def load_model(directory, config, model_cls, table, *, variant, dtype, mesh, rules):
  """`model_cls(config)` filled from the diffusers safetensors of `directory` by `table`."""
  ckpt = SafetensorsCheckpoint(directory, weights_name=DIFFUSERS_WEIGHTS, variant=variant)
  dt = torch_keys.check_dtype(dtype)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: model_cls(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
  )
  state = torch_keys.load_state(
      abstract, table, ckpt, what=model_cls.__name__, mesh=mesh, rules=rules
  )
  return nnx.merge(graphdef, state)


def save_model(directory, model, table, config_dict, *, dtype, variant, max_shard_bytes, overwrite):
  """Write config.json + diffusers safetensors of `model` by `table`; returns the files."""
  return torch_keys.save_directory(
      directory,
      model,
      table,
      lambda _: config_dict,
      weights_name=DIFFUSERS_WEIGHTS,
      dtype=dtype,
      variant=variant,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
  )


# --- UNet -------------------------------------------------------------------------------------


def read_unet_config(directory: str) -> UNetConfig:
  """The strict `UNetConfig` of directory/config.json."""
  return read_config(directory, UNetConfig.from_diffusers, "UNet2DConditionModel")


def load_unet(
    directory: str, *, variant: str | None = None, dtype: str = "float32", mesh=None, rules=None
) -> tuple[UNet2DConditionModel, UNetConfig]:
  """(model, config) from a diffusers UNet2DConditionModel directory, parameters and
  activations in `dtype`, placed by `parallel.spec_for(path, shape, mesh, rules)` (the default
  device when mesh is None). variant: the weights' variant ("fp16", "bf16"; None: plain)."""
  config = read_unet_config(directory)
  model = load_model(
      directory,
      config,
      UNet2DConditionModel,
      unet_key_table(config),
      variant=variant,
      dtype=dtype,
      mesh=mesh,
      rules=rules,
  )
  return model, config


def save_unet(
    directory: str,
    model: UNet2DConditionModel,
    *,
    dtype: str | None = None,
    variant: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> list[str]:
  """Write config.json + safetensors that diffusers' `UNet2DConditionModel.from_pretrained`
  loads; returns the files written. dtype: stored dtype (default the parameters')."""
  return save_model(
      directory,
      model,
      unet_key_table(model.config),
      model.config.to_diffusers(),
      dtype=dtype,
      variant=variant,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
  )
