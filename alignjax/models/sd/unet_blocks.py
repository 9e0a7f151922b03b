"""The down, mid and up blocks of Stable Diffusion's UNet (diffusers' unet_2d_blocks), NHWC.

With R_j the resnets (layers.py eq. 5), T_j the transformers (layers.py eq. 11), temb the time
embedding and c the text context:

    down block:  h <- T_j(R_j(h, temb), c) for j < n   (T_j absent in DownBlock2D);
                 skips = (h after each j, then h after the stride-2 downsampler if any)   (eq. 1)
    mid block:   h <- R_0(h, temb);  h <- R_1(T_0(h, c), temb)                          (eq. 2)
    up block:    h <- T_j(R_j([h, s_j], temb), c) for j < n+1, s_j the skips popped from
                 the end of the stack (channel concatenation), then the upsampler (to the
                 next skip's spatial size)                                               (eq. 3)

`CrossAttnDownBlock2D` / `DownBlock2D` are one class here (`DownBlock`, `attentions` None
without cross-attention), as are `CrossAttnUpBlock2D` / `UpBlock2D` (`UpBlock`), so the
parameter paths are diffusers' module names.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from alignjax.models.sd.layers import (
    Downsample2D,
    ResnetBlock2D,
    Transformer2DModel,
    Upsample2D,
    split,
)


@dataclasses.dataclass(frozen=True)
class AttnSpec:
  """The transformers of one block (None: a block without attention)."""

  heads: int
  cross_attention_dim: int
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False


def _transformer(channels, spec: AttnSpec, groups, key, kw):
  return Transformer2DModel(
      channels,
      spec.heads,
      spec.cross_attention_dim,
      groups=groups,
      use_linear_projection=spec.use_linear_projection,
      only_cross_attention=spec.only_cross_attention,
      upcast=spec.upcast,
      key=key,
      **kw,
  )


class DownBlock(nnx.Module):
  """Eq. 1: diffusers' CrossAttnDownBlock2D (attn given) or DownBlock2D (attn None)."""

  def __init__(
      self,
      cin: int,
      cout: int,
      temb_channels: int,
      num_layers: int,
      attn: AttnSpec | None,
      *,
      add_downsample: bool,
      downsample_padding: int,
      groups: int,
      eps: float,
      key,
      dtype,
      param_dtype,
  ):
    keys = split(key, 2 * num_layers + 1)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List(
        [
            ResnetBlock2D(
                cin if j == 0 else cout,
                cout,
                temb_channels,
                groups=groups,
                eps=eps,
                key=keys[j],
                **kw,
            )
            for j in range(num_layers)
        ]
    )
    self.attentions = (
        nnx.List(
            [_transformer(cout, attn, groups, keys[num_layers + j], kw) for j in range(num_layers)]
        )
        if attn is not None
        else None
    )
    self.downsamplers = (
        nnx.List([Downsample2D(cout, padding=downsample_padding, key=keys[-1], **kw)])
        if add_downsample
        else None
    )

  def __call__(self, x, temb, context):
    skips = []
    for j, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nnx.Module):
  """Eq. 2 (one transformer layer); resnets scaled by 1 / output_scale_factor."""

  def __init__(
      self,
      channels: int,
      temb_channels: int,
      attn: AttnSpec,
      *,
      groups: int,
      eps: float,
      output_scale_factor: float,
      key,
      dtype,
      param_dtype,
  ):
    k0, k1, ka = split(key, 3)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    rkw = dict(groups=groups, eps=eps, output_scale_factor=output_scale_factor, **kw)
    self.resnets = nnx.List(
        [
            ResnetBlock2D(channels, channels, temb_channels, key=k0, **rkw),
            ResnetBlock2D(channels, channels, temb_channels, key=k1, **rkw),
        ]
    )
    self.attentions = nnx.List([_transformer(channels, attn, groups, ka, kw)])

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      x = resnet(attn(x, context), temb)
    return x


class UpBlock(nnx.Module):
  """Eq. 3: diffusers' CrossAttnUpBlock2D (attn given) or UpBlock2D (attn None).
  resnet_in: the input channels of each resnet (incoming + skip channels)."""

  def __init__(
      self,
      resnet_in: tuple[int, ...],
      cout: int,
      temb_channels: int,
      attn: AttnSpec | None,
      *,
      add_upsample: bool,
      groups: int,
      eps: float,
      key,
      dtype,
      param_dtype,
  ):
    n = len(resnet_in)
    keys = split(key, 2 * n + 1)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List(
        [
            ResnetBlock2D(c, cout, temb_channels, groups=groups, eps=eps, key=keys[j], **kw)
            for j, c in enumerate(resnet_in)
        ]
    )
    self.attentions = (
        nnx.List([_transformer(cout, attn, groups, keys[n + j], kw) for j in range(n)])
        if attn is not None
        else None
    )
    self.upsamplers = nnx.List([Upsample2D(cout, key=keys[-1], **kw)]) if add_upsample else None

  def __call__(self, x, skips, temb, context, size=None):
    skips = list(skips)
    for j, resnet in enumerate(self.resnets):
      s = skips.pop()
      x = resnet(jnp.concatenate([x, s.astype(x.dtype)], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, size)
    return x
