"""Stable Diffusion 1.5 component configs (the published unet/ and vae/ config.json of the SD
1.5 pipeline; the VAE is stabilityai/sd-vae-ft-mse's), for shape-only work without weights:
`jax.eval_shape` checks of full-size training steps and the memory plan.

    SD15_UNET  859,520,964 parameters;  SD15_VAE  83,653,863 parameters
"""

from __future__ import annotations

from flax import nnx

from alignjax.models.sd.unet import UNet2DConditionModel, UNetConfig
from alignjax.models.sd.vae import AutoencoderKL, VAEConfig

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_TOKENS, SD15_TEXT_WIDTH = 77, 768  # CLIP ViT-L/14 text: embeddings [B, 77, 768]


def abstract_unet(config: dict = SD15_UNET, **kwargs) -> UNet2DConditionModel:
  """The UNet of `config` with shape-only parameters (nnx.eval_shape: no memory)."""
  cfg = UNetConfig.from_diffusers(config)
  return nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), **kwargs))


def abstract_vae(config: dict = SD15_VAE) -> AutoencoderKL:
  """The VAE of `config` with shape-only parameters."""
  cfg = VAEConfig.from_diffusers(config)
  return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
