"""A small class-conditional UNet (epsilon prediction) for the embedded 8x8x1 digits.

Embedding of the timestep t (int32 in [0, N)) and class id c (0..num_classes; the extra row
c = num_classes is the null id used by classifier-free guidance):

    freqs_i = exp(-ln(max_period) * i / (d/2)),           i = 0 .. d/2 - 1      (eq. 1)
    temb(t) = [cos(t * freqs), sin(t * freqs)]            in R^d                 (eq. 2)
    e       = W2 silu(W1 temb(t) + b1) + b2 + E[c]        (E: [num_classes+1, D]) (eq. 3)

Residual block (GroupNorm + SiLU + 3x3 conv, embedding injected per channel):

    h   = conv1(silu(GN1(x))) + (W_e silu(e) + b_e)[:, None, None, :]             (eq. 4)
    out = skip(x) + conv2(silu(GN2(h)))         (skip = 1x1 conv when widths differ) (eq. 5)

Self-attention block over the H*W positions (at the lowest resolution and at any resolution
listed in `attention_resolutions`), heads of size C/num_heads:

    q, k, v = split(W_qkv GN(x));   a = softmax(q k^T / sqrt(C/num_heads)) v
    out = x + W_o a                                                              (eq. 6)

Layout: conv_in -> for each level (widths `channels`): `num_res_blocks` residual blocks, then a
stride-2 conv downsample (8 -> 4 -> 2) except after the last level -> middle (res, attention,
res) -> mirror image with skip connections concatenated, nearest-neighbour x2 upsample + conv
-> GroupNorm, SiLU, conv_out (zero-initialised by default, so the initial prediction is 0).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models import io


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of `UNet` (JSON round trip with `to_dict` / `from_dict`)."""

  image_size: int = 8
  in_channels: int = 1
  out_channels: int = 1
  channels: tuple[int, ...] = (32, 64, 64)  # width per resolution level: 8, 4, 2
  num_res_blocks: int = 1
  attention_resolutions: tuple[int, ...] = (2,)  # spatial sizes with attention in down/up
  num_heads: int = 4
  num_groups: int = 8
  embed_dim: int = 128
  time_freq_dim: int = 32
  max_period: float = 10000.0
  num_classes: int = 10
  zero_init_output: bool = True  # conv_out starts at 0 (initial eps prediction is 0)

  def __post_init__(self):
    if self.image_size % (2 ** (len(self.channels) - 1)):
      raise ValueError(
          f"UNetConfig: image_size={self.image_size} must be divisible by "
          f"2**(len(channels)-1)={2 ** (len(self.channels) - 1)}"
      )
    for c in self.channels:
      if c % self.num_groups or c % self.num_heads:
        raise ValueError(
            f"UNetConfig: every width in channels={self.channels} must be divisible"
            f" by num_groups={self.num_groups} and num_heads={self.num_heads}"
        )
    if self.time_freq_dim % 2:
      raise ValueError(f"UNetConfig: time_freq_dim={self.time_freq_dim} must be even")
    for name in ("num_res_blocks", "embed_dim", "num_classes", "in_channels", "out_channels"):
      if getattr(self, name) <= 0:
        raise ValueError(f"UNetConfig: {name}={getattr(self, name)} must be > 0")

  @property
  def null_class(self) -> int:
    return self.num_classes

  def to_dict(self) -> dict:
    return io.config_to_dict(self)

  @classmethod
  def from_dict(cls, d) -> "UNetConfig":
    return io.config_from_dict(cls, d)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of timesteps t [B] -> [B, dim] (eqs. 1-2)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # eq. 1
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # eq. 2


def _conv(cin, cout, rngs, *, kernel=3, strides=1, zero=False):
  kw = {}
  if zero:
    kw = dict(kernel_init=nnx.initializers.zeros_init(), bias_init=nnx.initializers.zeros_init())
  return nnx.Conv(
      cin, cout, (kernel, kernel), strides=(strides, strides), padding="SAME", rngs=rngs, **kw
  )


class ResBlock(nnx.Module):
  """Residual block with embedding injection (eqs. 4-5)."""

  def __init__(self, cin: int, cout: int, embed_dim: int, num_groups: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(cin, num_groups=num_groups, rngs=rngs)
    self.conv1 = _conv(cin, cout, rngs)
    self.emb_proj = nnx.Linear(embed_dim, cout, rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, num_groups=num_groups, rngs=rngs)
    self.conv2 = _conv(cout, cout, rngs)
    self.skip = _conv(cin, cout, rngs, kernel=1) if cin != cout else None

  def __call__(self, x, emb):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = h + self.emb_proj(jax.nn.silu(emb))[:, None, None, :]  # eq. 4
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.skip(x) if self.skip is not None else x
    return skip + h  # eq. 5


class AttentionBlock(nnx.Module):
  """Multi-head self-attention over spatial positions with a residual connection (eq. 6)."""

  def __init__(self, channels: int, num_heads: int, num_groups: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm = nnx.GroupNorm(channels, num_groups=num_groups, rngs=rngs)
    self.qkv = nnx.Linear(channels, 3 * channels, rngs=rngs)
    self.out = nnx.Linear(channels, channels, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    d = c // self.num_heads
    qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, self.num_heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, heads, d]
    logits = jnp.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d)
    weights = jax.nn.softmax(logits, axis=-1)
    a = jnp.einsum("bhlm,bmhd->blhd", weights, v).reshape(b, h, w, c)
    return x + self.out(a)  # eq. 6


class Downsample(nnx.Module):

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, rngs, strides=2)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, rngs)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
    return self.conv(x)


class UNet(nnx.Module):
  """Class-conditional epsilon-prediction UNet: `__call__(x, t, cond) -> eps`."""

  MODEL_TYPE = "alignjax_unet"

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    cfg = config
    ch = cfg.channels
    self.time_mlp1 = nnx.Linear(cfg.time_freq_dim, cfg.embed_dim, rngs=rngs)
    self.time_mlp2 = nnx.Linear(cfg.embed_dim, cfg.embed_dim, rngs=rngs)
    self.class_embed = nnx.Embed(cfg.num_classes + 1, cfg.embed_dim, rngs=rngs)
    self.conv_in = _conv(cfg.in_channels, ch[0], rngs)

    def res(cin, cout):
      return ResBlock(cin, cout, cfg.embed_dim, cfg.num_groups, rngs=rngs)

    def attn(c):
      return AttentionBlock(c, cfg.num_heads, cfg.num_groups, rngs=rngs)

    # Down path: record the width of every skip tensor.
    down, skips = [], [ch[0]]
    cur, size = ch[0], cfg.image_size
    for level, width in enumerate(ch):
      for _ in range(cfg.num_res_blocks):
        down.append(res(cur, width))
        cur = width
        if size in cfg.attention_resolutions:
          down.append(attn(cur))
        skips.append(cur)
      if level < len(ch) - 1:
        down.append(Downsample(cur, rngs=rngs))
        size //= 2
        skips.append(cur)
    self.down = nnx.List(down)
    self.mid = nnx.List([res(cur, cur), attn(cur), res(cur, cur)])

    up = []
    for level in reversed(range(len(ch))):
      width = ch[level]
      for _ in range(cfg.num_res_blocks + 1):
        up.append(res(cur + skips.pop(), width))
        cur = width
        if size in cfg.attention_resolutions:
          up.append(attn(cur))
      if level > 0:
        up.append(Upsample(cur, rngs=rngs))
        size *= 2
    self.up = nnx.List(up)
    self.norm_out = nnx.GroupNorm(cur, num_groups=cfg.num_groups, rngs=rngs)
    self.conv_out = _conv(cur, cfg.out_channels, rngs, zero=cfg.zero_init_output)

  def embed(self, t: jax.Array, cond: jax.Array) -> jax.Array:
    """Time + class embedding e [B, embed_dim] (eq. 3)."""
    cfg = self.config
    temb = timestep_embedding(t, cfg.time_freq_dim, cfg.max_period)
    e = self.time_mlp2(jax.nn.silu(self.time_mlp1(temb)))
    return e + self.class_embed(cond)

  def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
    """x [B, H, W, in_channels] float, t [B] int (or scalar), cond [B] int -> eps like x."""
    cfg = self.config
    if x.ndim != 4 or x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(
          f"UNet: x has shape {x.shape}; expected [B, {cfg.image_size}, "
          f"{cfg.image_size}, {cfg.in_channels}]"
      )
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (b,)) if jnp.ndim(t) == 0 else jnp.asarray(t)
    cond = jnp.asarray(cond)
    if t.shape != (b,) or cond.shape != (b,):
      raise ValueError(f"UNet: t {t.shape} and cond {cond.shape} must have shape [B]=({b},)")
    emb = self.embed(t, cond)

    h = self.conv_in(x)
    hs = [h]
    for block in self.down:
      if isinstance(block, ResBlock):
        h = block(h, emb)
        hs.append(h)
      elif isinstance(block, AttentionBlock):
        h = block(h)
        hs[-1] = h
      else:
        h = block(h)
        hs.append(h)
    for block in self.mid:
      h = block(h, emb) if isinstance(block, ResBlock) else block(h)
    for block in self.up:
      if isinstance(block, ResBlock):
        h = block(jnp.concatenate([h, hs.pop()], axis=-1), emb)
      else:
        h = block(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


def param_count(model: nnx.Module) -> int:
  """Number of scalar parameters in `model`."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
