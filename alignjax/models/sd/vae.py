"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`) in Flax NNX, NHWC.

R: ResnetBlock2D without time embedding (layers.py eq. 5), A: the mid-block attention
(layers.py eq. 12), C_i = block_out_channels[i], n blocks, f = 2^(n-1) the downscale factor:

    encoder:  h = conv_in(x);  per block i: h <- R(...R(h)) (layers_per_block), then a
              stride-2 conv with (0, 1) padding (layers eq. 6) except after the last;
              mid: h <- R(A(R(h)))  (A omitted when mid_block_add_attention is false);
              moments = quant_conv(conv_out(silu(GN h)))   [B, H/f, W/f, 2 latent]    (eq. 1)
    posterior: mean, logvar = split(moments);  logvar <- clip(logvar, -30, 20);
              z = mean + exp(logvar / 2) eps,  eps ~ N(0, I)
              (diffusers' DiagonalGaussianDistribution)                               (eq. 2)
    decoder:  h = conv_in(post_quant_conv(z));  mid as above;  per block (reversed
              widths): layers_per_block + 1 resnets, then nearest x2 + conv except after
              the last;  x = conv_out(silu(GN h))                                     (eq. 3)

quant_conv / post_quant_conv are 1x1 convolutions (absent when use_quant_conv /
use_post_quant_conv is false). Stable Diffusion feeds the UNet scaling_factor * z and decodes
z / scaling_factor. Group norms use eps 1e-6 throughout, as diffusers' Encoder / Decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.sd.layers import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    Linear,
    ResnetBlock2D,
    Upsample2D,
    VAEAttention,
    split,
)
from alignjax.models.sd.unet import DEFAULT_DIFFUSERS_VERSION, check_fixed

CLASS_NAME = "AutoencoderKL"
DOWN_TYPES = ("DownEncoderBlock2D",)
UP_TYPES = ("UpDecoderBlock2D",)
ACT_FNS = ("silu", "swish")
METADATA_KEYS = frozenset(
    {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
)
FIXED = {"shift_factor": None, "latents_mean": None, "latents_std": None}
EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' AutoencoderKL config (defaults: diffusers')."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  force_upcast: bool = True  # recorded: diffusers decodes in float32 when set
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  diffusers_version: str = DEFAULT_DIFFUSERS_VERSION

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    n = len(self.block_out_channels)
    if not n or len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
          f"VAEConfig: down_block_types, up_block_types and block_out_channels must have the "
          f"same (non-zero) length; got {self.down_block_types}, {self.up_block_types}, "
          f"{self.block_out_channels}"
      )
    for types, allowed in ((self.down_block_types, DOWN_TYPES), (self.up_block_types, UP_TYPES)):
      for t in types:
        if t not in allowed:
          raise ValueError(f"VAEConfig: block type {t!r} is not supported; supported: {allowed}")
    if self.act_fn not in ACT_FNS:
      raise ValueError(f"VAEConfig: act_fn={self.act_fn!r} is not supported; supported: {ACT_FNS}")
    for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"VAEConfig: {name}={v!r} must be an integer >= 1")
    for c in self.block_out_channels:
      if not isinstance(c, int) or c % self.norm_num_groups:
        raise ValueError(
            f"VAEConfig: block width {c!r} must be divisible by norm_num_groups="
            f"{self.norm_num_groups}"
        )
    for name in (
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
        "force_upcast",
    ):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"VAEConfig: {name}={getattr(self, name)!r} must be true or false")

  @property
  def downscale_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """A diffusers AutoencoderKL config.json dict, read strictly: unknown fields and
    shift_factor / latents_mean / latents_std other than null are refused by name."""
    if not isinstance(d, Mapping):
      raise ValueError(f"VAEConfig: expected a config dict, got {type(d).__name__}")
    name = d.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
      raise ValueError(f"VAEConfig: _class_name={name!r} is not supported; supported: {CLASS_NAME}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"diffusers_version"}
    unknown = sorted(set(d) - fields - set(FIXED) - METADATA_KEYS)
    if unknown:
      raise ValueError(
          f"VAEConfig: unsupported AutoencoderKL field(s) {unknown}; supported: "
          f"{sorted(fields | set(FIXED))}"
      )
    check_fixed(d, FIXED, "VAEConfig")
    kw = {k: d[k] for k in fields if k in d}
    if "_diffusers_version" in d:
      kw["diffusers_version"] = str(d["_diffusers_version"])
    return cls(**kw)

  def to_diffusers(self) -> dict:
    """config.json contents diffusers' AutoencoderKL.from_pretrained reads back."""
    out: dict[str, Any] = {"_class_name": CLASS_NAME, "_diffusers_version": self.diffusers_version}
    for f in dataclasses.fields(self):
      if f.name != "diffusers_version":
        v = getattr(self, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    out.update(FIXED)
    return out


class DownEncoderBlock2D(nnx.Module):

  def __init__(self, cin, cout, num_layers, *, add_downsample, groups, key, dtype, param_dtype):
    keys = split(key, num_layers + 1)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List(
        [
            ResnetBlock2D(cin if j == 0 else cout, cout, None, groups=groups, eps=EPS, key=k, **kw)
            for j, k in enumerate(keys[:-1])
        ]
    )
    self.downsamplers = (
        nnx.List([Downsample2D(cout, padding=0, key=keys[-1], **kw)]) if add_downsample else None
    )

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, cin, cout, num_layers, *, add_upsample, groups, key, dtype, param_dtype):
    keys = split(key, num_layers + 1)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List(
        [
            ResnetBlock2D(cin if j == 0 else cout, cout, None, groups=groups, eps=EPS, key=k, **kw)
            for j, k in enumerate(keys[:-1])
        ]
    )
    self.upsamplers = nnx.List([Upsample2D(cout, key=keys[-1], **kw)]) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.upsamplers is None else self.upsamplers[0](x)


class UNetMidBlock2D(nnx.Module):
  """R(A(R(h))) (A omitted without attention)."""

  def __init__(self, channels, *, attention: bool, groups, key, dtype, param_dtype):
    k0, k1, ka = split(key, 3)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List(
        [
            ResnetBlock2D(channels, channels, None, groups=groups, eps=EPS, key=k, **kw)
            for k in (k0, k1)
        ]
    )
    self.attentions = (
        nnx.List([VAEAttention(channels, groups=groups, eps=EPS, key=ka, **kw)])
        if attention
        else None
    )

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):

  def __init__(self, c: VAEConfig, *, key, dtype, param_dtype):
    ch, n = c.block_out_channels, len(c.block_out_channels)
    k_in, k_mid, k_out, *kb = split(key, 3 + n)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    g = c.norm_num_groups
    self.conv_in = Conv2d(c.in_channels, ch[0], key=k_in, **kw)
    self.down_blocks = nnx.List(
        [
            DownEncoderBlock2D(
                ch[max(i - 1, 0)],
                ch[i],
                c.layers_per_block,
                add_downsample=i < n - 1,
                groups=g,
                key=kb[i],
                **kw,
            )
            for i in range(n)
        ]
    )
    self.mid_block = UNetMidBlock2D(
        ch[-1], attention=c.mid_block_add_attention, groups=g, key=k_mid, **kw
    )
    self.conv_norm_out = GroupNorm(ch[-1], g, eps=EPS, param_dtype=param_dtype)
    self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, key=k_out, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, c: VAEConfig, *, key, dtype, param_dtype):
    rev, n = list(reversed(c.block_out_channels)), len(c.block_out_channels)
    k_in, k_mid, k_out, *kb = split(key, 3 + n)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    g = c.norm_num_groups
    self.conv_in = Conv2d(c.latent_channels, rev[0], key=k_in, **kw)
    self.mid_block = UNetMidBlock2D(
        rev[0], attention=c.mid_block_add_attention, groups=g, key=k_mid, **kw
    )
    self.up_blocks = nnx.List(
        [
            UpDecoderBlock2D(
                rev[max(i - 1, 0)],
                rev[i],
                c.layers_per_block + 1,
                add_upsample=i < n - 1,
                groups=g,
                key=kb[i],
                **kw,
            )
            for i in range(n)
        ]
    )
    self.conv_norm_out = GroupNorm(rev[-1], g, eps=EPS, param_dtype=param_dtype)
    self.conv_out = Conv2d(rev[-1], c.out_channels, key=k_out, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """Eqs. 1-3: encode(x [B, H, W, C]) -> (mean, logvar), each [B, H/f, W/f, latent];
  decode(z) -> [B, H, W, C]; sample(key, mean, logvar) draws z (eq. 2)."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    c = self.config = config
    self.dtype = dtype
    self.scaling_factor = c.scaling_factor
    ke, kd, kq, kp = split(rngs.params(), 4)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    lat = c.latent_channels
    self.encoder = Encoder(c, key=ke, **kw)
    self.quant_conv = Linear(2 * lat, 2 * lat, key=kq, **kw) if c.use_quant_conv else None
    self.decoder = Decoder(c, key=kd, **kw)
    self.post_quant_conv = Linear(lat, lat, key=kp, **kw) if c.use_post_quant_conv else None

  def _check(self, x, channels, what):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"AutoencoderKL.{what}: expected [B, H, W, {channels}], got {x.shape}")

  def encode(self, x):
    """Eqs. 1-2: (mean, logvar) of the posterior."""
    self._check(x, self.config.in_channels, "encode")
    moments = self.encoder(x.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  @staticmethod
  def sample(key, mean, logvar):
    """Eq. 2: z = mean + exp(logvar / 2) eps."""
    eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps

  def decode(self, z):
    """Eq. 3."""
    self._check(z, self.config.latent_channels, "decode")
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    """decode(mean of encode(x)): the reconstruction through the posterior mode."""
    return self.decode(self.encode(x)[0])
