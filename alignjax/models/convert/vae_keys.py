"""diffusers AutoencoderKL checkpoints <-> `alignjax.models.sd.vae`: key table, loading, saving.

The directory layout (a pipeline's vae/) and the naming rule are unet_keys' (config.json +
`diffusion_pytorch_model[.<variant>].safetensors`, possibly sharded; torch `weight` ->
`kernel` / `scale`). The mid-block attention's tensors are diffusers' current names
(`attentions.0.to_q`, ..., `group_norm`); checkpoints in the old attention-block naming
(`query`, `key`, `value`, `proj_attn`) are refused as unused / missing tensors: re-save them
with diffusers first. quant_conv and post_quant_conv are 1x1 convolutions held as Dense layers.
"""

from __future__ import annotations

from alignjax.models.convert.torch_keys import Key
from alignjax.models.convert.unet_keys import (
    DEFAULT_MAX_SHARD_BYTES,
    conv,
    conv1x1,
    load_model,
    norm,
    read_config,
    resnet,
    save_model,
    vae_attention,
)
from alignjax.models.sd.vae import AutoencoderKL, VAEConfig


def _mid(t: str, o: str, ch: int, attention: bool) -> list[Key]:
  keys = []
  for j in (0, 1):
    keys += resnet(f"{t}.resnets.{j}", f"{o}/resnets/{j}", ch, ch, False)
  return keys + (vae_attention(f"{t}.attentions.0", f"{o}/attentions/0") if attention else [])


def vae_key_table(config: VAEConfig) -> list[Key]:
  """Every parameter of `AutoencoderKL(config)` and its diffusers tensor."""
  c = config
  ch, n = c.block_out_channels, len(c.block_out_channels)
  keys = conv("encoder.conv_in", "encoder/conv_in")
  for i in range(n):
    t, o = f"encoder.down_blocks.{i}", f"encoder/down_blocks/{i}"
    for j in range(c.layers_per_block):
      cin = ch[max(i - 1, 0)] if j == 0 else ch[i]
      keys += resnet(f"{t}.resnets.{j}", f"{o}/resnets/{j}", cin, ch[i], False)
    if i < n - 1:
      keys += conv(f"{t}.downsamplers.0.conv", f"{o}/downsamplers/0/conv")
  keys += _mid("encoder.mid_block", "encoder/mid_block", ch[-1], c.mid_block_add_attention)
  keys += norm("encoder.conv_norm_out", "encoder/conv_norm_out")
  keys += conv("encoder.conv_out", "encoder/conv_out")
  if c.use_quant_conv:
    keys += conv1x1("quant_conv", "quant_conv")
  if c.use_post_quant_conv:
    keys += conv1x1("post_quant_conv", "post_quant_conv")
  rev = list(reversed(ch))
  keys += conv("decoder.conv_in", "decoder/conv_in")
  keys += _mid("decoder.mid_block", "decoder/mid_block", rev[0], c.mid_block_add_attention)
  for i in range(n):
    t, o = f"decoder.up_blocks.{i}", f"decoder/up_blocks/{i}"
    for j in range(c.layers_per_block + 1):
      cin = rev[max(i - 1, 0)] if j == 0 else rev[i]
      keys += resnet(f"{t}.resnets.{j}", f"{o}/resnets/{j}", cin, rev[i], False)
    if i < n - 1:
      keys += conv(f"{t}.upsamplers.0.conv", f"{o}/upsamplers/0/conv")
  keys += norm("decoder.conv_norm_out", "decoder/conv_norm_out")
  keys += conv("decoder.conv_out", "decoder/conv_out")
  return keys


def read_vae_config(directory: str) -> VAEConfig:
  """The strict `VAEConfig` of directory/config.json."""
  return read_config(directory, VAEConfig.from_diffusers, "AutoencoderKL")


def load_vae(
    directory: str, *, variant: str | None = None, dtype: str = "float32", mesh=None, rules=None
) -> tuple[AutoencoderKL, VAEConfig]:
  """(model, config) from a diffusers AutoencoderKL directory (see `unet_keys.load_unet`)."""
  config = read_vae_config(directory)
  model = load_model(
      directory,
      config,
      AutoencoderKL,
      vae_key_table(config),
      variant=variant,
      dtype=dtype,
      mesh=mesh,
      rules=rules,
  )
  return model, config


def save_vae(
    directory: str,
    model: AutoencoderKL,
    *,
    dtype: str | None = None,
    variant: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> list[str]:
  """Write config.json + safetensors that diffusers' `AutoencoderKL.from_pretrained` loads."""
  return save_model(
      directory,
      model,
      vae_key_table(model.config),
      model.config.to_diffusers(),
      dtype=dtype,
      variant=variant,
      max_shard_bytes=max_shard_bytes,
      overwrite=overwrite,
  )
