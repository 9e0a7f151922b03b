"""Stable Diffusion's conditional UNet (diffusers' `UNet2DConditionModel`, SD 1.x / 2.x) in
Flax NNX, NHWC in and out.

With x [B, H, W, C_in] the noisy latents, t [B] the timesteps and c [B, S, D_ctx] the text
embeddings (layers.py and unet_blocks.py give each piece):

    temb   = TimestepEmbedding(Timesteps(t))          (layers eqs. 3-4, width 4 C_0)   (eq. 1)
    h      = conv_in(x);  skips = (h,)
    h, s_i = down_i(h, temb, c);  skips += s_i        (unet_blocks eq. 1)              (eq. 2)
    h      = mid(h, temb, c)                          (unet_blocks eq. 2)              (eq. 3)
    h      = up_i(h, last len(up_i.resnets) skips, temb, c)   (unet_blocks eq. 3)       (eq. 4)
    out    = conv_out(silu(GN(h)))                                                     (eq. 5)

`UNetConfig.from_diffusers(d)` reads a diffusers unet/config.json strictly: the fields SD 1.x
and 2.x use are translated; every other `UNet2DConditionModel` field must hold its default
(None / False / 1 ...), else a ValueError names it and the values supported; unknown keys
are refused. Naming quirk of diffusers (issue 2011): for these UNets `attention_head_dim` is
the number of heads of each block (head size = block width / heads), and
`num_attention_heads` must be null.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.sd.layers import Conv2d, GroupNorm, TimestepEmbedding, Timesteps, split
from alignjax.models.sd.unet_blocks import AttnSpec, DownBlock, UNetMidBlock2DCrossAttn, UpBlock

CLASS_NAME = "UNet2DConditionModel"
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)
ACT_FNS = ("silu", "swish")
METADATA_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path"})
DEFAULT_DIFFUSERS_VERSION = "0.30.0"

# UNet2DConditionModel fields alignjax does not implement: each must keep this value.
FIXED = {
    "center_input_sample": False,
    "dropout": 0.0,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _same(a, b) -> bool:
  """JSON value equality, 1 == 1.0 but not True == 1."""
  if isinstance(a, bool) or isinstance(b, bool):
    return a is b
  return a == b


def check_fixed(d: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
  """Each key of `fixed` present in `d` must hold its value (lists of all-equal values
  accepted for transformer_layers_per_block)."""
  for key, value in fixed.items():
    if key not in d:
      continue
    got = d[key]
    if key == "transformer_layers_per_block" and isinstance(got, list):
      ok = all(_same(g, value) for g in got)
    else:
      ok = _same(got, value)
    if not ok:
      raise ValueError(
          f"{what}: {key}={got!r} is not supported; alignjax supports only {key}={value!r}"
      )


def _per_block(name: str, value, n: int, check) -> tuple:
  """An int / bool broadcast to n blocks, or a list of n of them."""
  values = list(value) if isinstance(value, (list, tuple)) else [value] * n
  if len(values) != n or not all(check(v) for v in values):
    raise ValueError(f"UNetConfig: {name}={value!r} must be one value or a list of {n}")
  return tuple(values)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The fields of diffusers' UNet2DConditionModel config that SD 1.x / 2.x use (defaults:
  diffusers')."""

  sample_size: int | None = None
  in_channels: int = 4
  out_channels: int = 4
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D",
      "CrossAttnDownBlock2D",
      "CrossAttnDownBlock2D",
      "DownBlock2D",
  )
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = (
      "UpBlock2D",
      "CrossAttnUpBlock2D",
      "CrossAttnUpBlock2D",
      "CrossAttnUpBlock2D",
  )
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  attention_head_dim: int | tuple[int, ...] = 8
  use_linear_projection: bool = False
  upcast_attention: bool = False
  mid_block_only_cross_attention: bool | None = None  # no effect on UNetMidBlock2DCrossAttn
  diffusers_version: str = DEFAULT_DIFFUSERS_VERSION

  def __post_init__(self):
    n = len(self.block_out_channels)
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
      if len(getattr(self, name)) != n or n == 0:
        raise ValueError(
            f"UNetConfig: down_block_types, up_block_types and block_out_channels must have the "
            f"same (non-zero) length; got {self.down_block_types}, {self.up_block_types}, "
            f"{self.block_out_channels}"
        )
    for name in ("only_cross_attention", "attention_head_dim"):
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    for t in self.down_block_types:
      if t not in DOWN_TYPES:
        raise ValueError(
            f"UNetConfig: down block type {t!r} is not supported; supported: {DOWN_TYPES}"
        )
    for t in self.up_block_types:
      if t not in UP_TYPES:
        raise ValueError(f"UNetConfig: up block type {t!r} is not supported; supported: {UP_TYPES}")
    if self.mid_block_type not in MID_TYPES:
      raise ValueError(
          f"UNetConfig: mid_block_type={self.mid_block_type!r} is not supported; supported: "
          f"{MID_TYPES}"
      )
    if self.act_fn not in ACT_FNS:
      raise ValueError(f"UNetConfig: act_fn={self.act_fn!r} is not supported; supported: {ACT_FNS}")
    for name in ("flip_sin_to_cos", "use_linear_projection", "upcast_attention"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"UNetConfig: {name}={getattr(self, name)!r} must be true or false")
    if self.mid_block_only_cross_attention not in (None, False, True):
      raise ValueError(
          f"UNetConfig: mid_block_only_cross_attention={self.mid_block_only_cross_attention!r} "
          "must be null, true or false"
      )
    for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
        raise ValueError(f"UNetConfig: {name}={getattr(self, name)!r} must be an integer >= 1")
    if not _is_int(self.cross_attention_dim) or self.cross_attention_dim < 1:
      raise ValueError(
          f"UNetConfig: cross_attention_dim={self.cross_attention_dim!r} is not supported; "
          "supported: one integer for every block"
      )
    if self.sample_size is not None and not _is_int(self.sample_size):
      raise ValueError(f"UNetConfig: sample_size={self.sample_size!r} must be an integer or null")
    if not _is_int(self.downsample_padding) or self.downsample_padding < 0:
      raise ValueError(f"UNetConfig: downsample_padding={self.downsample_padding!r} must be >= 0")
    heads = self.heads
    _ = self.only_cross  # validates
    for c, h in zip(self.block_out_channels, heads):
      if not _is_int(c) or c % self.norm_num_groups or c % h:
        raise ValueError(
            f"UNetConfig: block width {c!r} must be divisible by norm_num_groups="
            f"{self.norm_num_groups} and its number of heads {h} (attention_head_dim)"
        )

  @property
  def heads(self) -> tuple[int, ...]:
    """Heads of each down block (diffusers' attention_head_dim: the quirk above)."""
    n = len(self.block_out_channels)
    return _per_block(
        "attention_head_dim", self.attention_head_dim, n, lambda v: _is_int(v) and v >= 1
    )

  @property
  def only_cross(self) -> tuple[bool, ...]:
    n = len(self.block_out_channels)
    return _per_block(
        "only_cross_attention", self.only_cross_attention, n, lambda v: isinstance(v, bool)
    )

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  def _attn(self, heads: int, only_cross: bool) -> AttnSpec:
    return AttnSpec(
        heads=heads,
        cross_attention_dim=self.cross_attention_dim,
        use_linear_projection=self.use_linear_projection,
        only_cross_attention=only_cross,
        upcast=self.upcast_attention,
    )

  def down_specs(self) -> list[dict]:
    """Per down block: in / out channels, layers, AttnSpec or None, downsampling."""
    ch, n, specs = self.block_out_channels, len(self.block_out_channels), []
    for i, t in enumerate(self.down_block_types):
      attn = self._attn(self.heads[i], self.only_cross[i]) if t == DOWN_TYPES[0] else None
      specs.append(
          dict(
              cin=ch[max(i - 1, 0)],
              cout=ch[i],
              num_layers=self.layers_per_block,
              attn=attn,
              add_downsample=i < n - 1,
          )
      )
    return specs

  def mid_attn(self) -> AttnSpec:
    return self._attn(self.heads[-1], False)

  def up_specs(self) -> list[dict]:
    """Per up block: each resnet's input channels (incoming + skip), out channels, AttnSpec
    or None, upsampling (diffusers' channel bookkeeping)."""
    rev = list(reversed(self.block_out_channels))
    heads, only = list(reversed(self.heads)), list(reversed(self.only_cross))
    n, specs, prev = len(rev), [], rev[0]
    layers = self.layers_per_block + 1
    for i, t in enumerate(self.up_block_types):
      cout, cin = rev[i], rev[min(i + 1, n - 1)]
      resnet_in = tuple(
          (prev if j == 0 else cout) + (cin if j == layers - 1 else cout) for j in range(layers)
      )
      attn = self._attn(heads[i], only[i]) if t == UP_TYPES[1] else None
      specs.append(dict(resnet_in=resnet_in, cout=cout, attn=attn, add_upsample=i < n - 1))
      prev = cout
    return specs

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "UNetConfig":
    """A diffusers UNet2DConditionModel config.json dict (strict; module docstring)."""
    if not isinstance(d, Mapping):
      raise ValueError(f"UNetConfig: expected a config dict, got {type(d).__name__}")
    name = d.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
      raise ValueError(
          f"UNetConfig: _class_name={name!r} is not supported; supported: {CLASS_NAME}"
      )
    fields = {f.name for f in dataclasses.fields(cls)} - {"diffusers_version"}
    unknown = sorted(set(d) - fields - set(FIXED) - METADATA_KEYS - {"_use_default_values"})
    if unknown:
      raise ValueError(
          f"UNetConfig: unsupported UNet2DConditionModel field(s) {unknown}; supported: "
          f"{sorted(fields | set(FIXED))}"
      )
    check_fixed(d, FIXED, "UNetConfig")
    kw = {k: d[k] for k in fields if k in d}
    for k in ("down_block_types", "up_block_types", "block_out_channels"):
      if k in kw:
        kw[k] = tuple(kw[k])
    for k in ("only_cross_attention", "attention_head_dim"):
      if isinstance(kw.get(k), list):
        kw[k] = tuple(kw[k])
    if "_diffusers_version" in d:
      kw["diffusers_version"] = str(d["_diffusers_version"])
    return cls(**kw)

  def to_diffusers(self) -> dict:
    """config.json contents diffusers' UNet2DConditionModel.from_pretrained reads back."""
    out: dict[str, Any] = {"_class_name": CLASS_NAME, "_diffusers_version": self.diffusers_version}
    for f in dataclasses.fields(self):
      if f.name == "diffusers_version":
        continue
      v = getattr(self, f.name)
      out[f.name] = list(v) if isinstance(v, tuple) else v
    out.update(FIXED)
    return out


def _call(block, x, temb, context):
  return block(x, temb, context)


def _rematerialised(fn):
  """fn(block, *args) recomputed in the backward pass: `jax.checkpoint` of a pure function of
  the block's state (nnx.remat mutates the block's Params across trace levels, which fails
  when the UNet runs inside a `lax.scan`, e.g. the sampler's)."""

  def call(block, *args):
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda state, *args: fn(nnx.merge(graphdef, state), *args))(state, *args)

  return call


def _up_call(size):
  """An up block's call with its (static) output size closed over, for remat."""

  def call(block, x, skips, temb, context):
    return block(x, skips, temb, context, size=size)

  return call


class UNet2DConditionModel(nnx.Module):
  """Eqs. 1-5. __call__(sample [B, H, W, C_in], timesteps [B] or scalar, encoder_hidden_states
  [B, S, cross_attention_dim]) -> [B, H, W, C_out]. remat: recompute each down / mid / up
  block in the backward pass (`jax.checkpoint`), the default of every call."""

  def __init__(
      self,
      config: UNetConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat: bool = False,
      rngs: nnx.Rngs,
  ):
    c = self.config = config
    self.dtype, self.remat = dtype, remat
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    key = rngs.params()
    n = len(c.block_out_channels)
    k_in, k_t, k_mid, k_out, *kb = split(key, 4 + 2 * n)
    ch0, temb = c.block_out_channels[0], c.time_embed_dim
    groups, eps = c.norm_num_groups, c.norm_eps
    self.conv_in = Conv2d(c.in_channels, ch0, key=k_in, **kw)
    self.time_proj = Timesteps(ch0, c.flip_sin_to_cos, c.freq_shift)
    self.time_embedding = TimestepEmbedding(ch0, temb, key=k_t, **kw)
    self.down_blocks = nnx.List(
        [
            DownBlock(
                s["cin"],
                s["cout"],
                temb,
                s["num_layers"],
                s["attn"],
                add_downsample=s["add_downsample"],
                downsample_padding=c.downsample_padding,
                groups=groups,
                eps=eps,
                key=kb[i],
                **kw,
            )
            for i, s in enumerate(c.down_specs())
        ]
    )
    self.mid_block = UNetMidBlock2DCrossAttn(
        c.block_out_channels[-1],
        temb,
        c.mid_attn(),
        groups=groups,
        eps=eps,
        output_scale_factor=c.mid_block_scale_factor,
        key=k_mid,
        **kw,
    )
    self.up_blocks = nnx.List(
        [
            UpBlock(
                s["resnet_in"],
                s["cout"],
                temb,
                s["attn"],
                add_upsample=s["add_upsample"],
                groups=groups,
                eps=eps,
                key=kb[n + i],
                **kw,
            )
            for i, s in enumerate(c.up_specs())
        ]
    )
    self.conv_norm_out = GroupNorm(ch0, groups, eps=eps, param_dtype=param_dtype)
    self.conv_out = Conv2d(ch0, c.out_channels, key=k_out, **kw)

  def __call__(self, sample, timesteps, encoder_hidden_states, *, remat: bool | None = None):
    c = self.config
    if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
      raise ValueError(
          f"UNet2DConditionModel: sample must be [B, H, W, {c.in_channels}], got {sample.shape}"
      )
    ctx = encoder_hidden_states
    if ctx.ndim != 3 or ctx.shape[0] != sample.shape[0] or ctx.shape[-1] != c.cross_attention_dim:
      raise ValueError(
          f"UNet2DConditionModel: encoder_hidden_states must be [{sample.shape[0]}, S, "
          f"{c.cross_attention_dim}], got {ctx.shape}"
      )
    remat = self.remat if remat is None else remat
    wrap = _rematerialised if remat else (lambda f: f)
    b = sample.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
    emb = self.time_embedding(self.time_proj(t).astype(self.dtype))  # eq. 1
    ctx = ctx.astype(self.dtype)
    x = self.conv_in(sample.astype(self.dtype))
    skips = [x]
    for block in self.down_blocks:  # eq. 2
      x, s = wrap(_call)(block, x, emb, ctx)
      skips.extend(s)
    x = wrap(_call)(self.mid_block, x, emb, ctx)  # eq. 3
    for i, block in enumerate(self.up_blocks):  # eq. 4
      n = len(block.resnets)
      res, skips = skips[-n:], skips[:-n]
      size = tuple(skips[-1].shape[1:3]) if i < len(self.up_blocks) - 1 else None
      x = wrap(_up_call(size))(block, x, tuple(res), emb, ctx)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # eq. 5
