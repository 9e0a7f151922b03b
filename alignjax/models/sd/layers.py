"""Layers shared by Stable Diffusion's UNet and VAE, mirroring diffusers' modules in NHWC.

Parameter paths follow diffusers' module names (`alignjax.models.convert.unet_keys` /
`vae_keys` are plain tables). Shapes: B batch, H, W spatial, C channels, L = H W positions,
S context length, N heads, D head size. Every tensor is NHWC ([B, H, W, C]).

    GroupNorm:  x split into G groups of C/G channels; per sample and group,
                y = (x - mean) / sqrt(var + eps) * scale + bias   (float32 statistics) (eq. 1)
    LayerNorm:  eq. 1 over the channel axis alone (one group of one position)        (eq. 2)
    Timesteps:  half = d/2,  f_i = exp(-ln(10000) i / (half - shift)),  i < half;
                e(t) = [sin(t f), cos(t f)], or [cos(t f), sin(t f)] with flip_sin_to_cos
                (zero-padded to d when d is odd; diffusers' `get_timestep_embedding`) (eq. 3)
    TimestepEmbedding:  temb = W_2 silu(W_1 e(t) + b_1) + b_2                         (eq. 4)
    ResnetBlock2D:  h = conv1(silu(GN1 x)) + W_t silu(temb) + b_t   (temb term only when the
                    block has time_emb_proj);  h = conv2(silu(GN2 h));
                    out = (shortcut(x) + h) / output_scale_factor,
                    shortcut = 1x1 conv when in != out channels, else identity        (eq. 5)
    Downsample2D:  3x3 conv, stride 2, zero padding p on each side; p = 0 pads (0, 1) on the
                   bottom and right only (the VAE's asymmetric padding)                (eq. 6)
    Upsample2D:    nearest-neighbour resize (x2, or to the skip connection's size), 3x3 conv
                                                                                       (eq. 7)
    Attention:  a = softmax(q k^T / sqrt(D)) v per head,  q = x W_q,  k = c W_k,  v = c W_v
                (c = x for self-attention), out = a W_o + b_o                         (eq. 8)
    GEGLU FF:   [u, g] = x W_1 + b_1 (two halves);  ff(x) = (u * gelu(g)) W_2 + b_2
                (exact, erf-based gelu)                                               (eq. 9)
    BasicTransformerBlock:
                x <- x + attn1(LN1 x)      (self-attention; cross-attention to the context
                                            when only_cross_attention)
                x <- x + attn2(LN2 x, ctx) (cross-attention)
                x <- x + ff(LN3 x)                                                    (eq. 10)
    Transformer2DModel:  h = proj_in(GN x) over the L positions (a 1x1 conv or a linear
                layer: the same map), blocks (eq. 10), out = proj_out(h) + x           (eq. 11)
    VAE attention:  h = GN x over L positions, out = (x + attention(h) (eq. 8, heads of size
                C)) / rescale_output_factor                                           (eq. 12)

The modules take PRNG keys rather than `nnx.Rngs` (one `Rngs` draw per model, split here), as
`alignjax.models.sd.clip` does, so `nnx.eval_shape` of a full-size UNet stays fast. GroupNorm
and LayerNorm are written here, not `nnx.GroupNorm` / `nnx.LayerNorm`: the same parameters
(scale, bias) and maths as torch's, with two-pass float32 statistics in any compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.models.sd.attention import attention, merge_heads, split_heads


def split(key, n: int) -> list:
  """n child keys of `key` (fold_in 0..n-1: one compiled program for every n, where
  `jax.random.split` compiles once per n when run eagerly)."""
  return [jax.random.fold_in(key, i) for i in range(n)]


def _uniform(key, shape, fan_in: int, dtype):
  """torch's default init of nn.Linear / nn.Conv2d weights and biases, U(-1/sqrt(fan_in), .),
  drawn on the host by numpy seeded from `key`: the same values eagerly and under jit, with
  nothing to compile per shape (threefry costs ~0.5 s of compilation per shape on CPU). Under
  `nnx.eval_shape` nothing is drawn."""
  bound = 1.0 / math.sqrt(fan_in)
  shape, dtype = tuple(shape), jnp.dtype(dtype)

  def draw(data):
    rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
    return rng.uniform(-bound, bound, shape).astype(np.float32).astype(dtype)

  data = jax.random.key_data(key)
  if isinstance(data, jax.core.Tracer):
    return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), data)
  return jnp.asarray(draw(data))


def _full(shape, value: float, dtype):
  """A constant parameter made on the host (no per-shape compilation when eager)."""
  return jnp.asarray(np.full(shape, value, jnp.dtype(dtype)))


class Linear(nnx.Module):
  """y = x kernel + bias over the last axis, kernel [in, out] (nn.Linear, transposed; also a
  1x1 nn.Conv2d applied to NHWC)."""

  def __init__(self, n_in: int, n_out: int, *, key, bias: bool = True, dtype, param_dtype):
    kw, kb = split(key, 2)
    self.kernel = nnx.Param(_uniform(kw, (n_in, n_out), n_in, param_dtype))
    self.bias = nnx.Param(_uniform(kb, (n_out,), n_in, param_dtype)) if bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Conv2d(nnx.Module):
  """k x k convolution of NHWC inputs, kernel [k, k, in, out] (nn.Conv2d's weight
  [out, in, k, k] transposed); padding: ((top, bottom), (left, right))."""

  def __init__(
      self,
      cin: int,
      cout: int,
      kernel_size: int = 3,
      *,
      stride: int = 1,
      padding=None,
      key,
      dtype,
      param_dtype,
  ):
    kw, kb = split(key, 2)
    fan_in = cin * kernel_size * kernel_size
    shape = (kernel_size, kernel_size, cin, cout)
    self.kernel = nnx.Param(_uniform(kw, shape, fan_in, param_dtype))
    self.bias = nnx.Param(_uniform(kb, (cout,), fan_in, param_dtype))
    p = (kernel_size - 1) // 2
    self.padding = tuple(padding) if padding is not None else ((p, p), (p, p))
    self.stride = stride
    self.dtype = dtype

  def __call__(self, x):
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if _patch_matmul_applies(x, kernel, self.stride):
      y = _conv_as_matmul(x, kernel, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
          x,
          kernel,
          window_strides=(self.stride, self.stride),
          padding=self.padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    return y + self.bias[...].astype(self.dtype)


# XLA:CPU's convolution reaches ~30-45 GFLOP/s on the UNet's 8x8 and 4x4 feature maps with
# 1280 channels, where one matrix product over the k*k*C patches runs at ~90 (2-core EPYC,
# float32, batch 2); at 16x16 the product is 0-30 % faster (1280 -> 1280 channels: 203 against
# 149 ms), at 32x32 and 64x64 the convolution is faster (90-140 against 55-105 GFLOP/s) and is
# kept. GPU and TPU programs are untouched.
_PATCH_MATMUL_MAX_POSITIONS = 256


def _patch_matmul_applies(x, kernel, stride: int) -> bool:
  return (
      jax.default_backend() == "cpu"
      and stride == 1
      and kernel.shape[0] > 1
      and x.shape[1] * x.shape[2] <= _PATCH_MATMUL_MAX_POSITIONS
  )


def _conv_as_matmul(x, kernel, padding):
  """The stride-1 convolution as one product of the [B, H', W', k*k*C] patches (im2col)."""
  kh, kw, cin, cout = kernel.shape
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  patches = [xp[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]
  return jnp.concatenate(patches, axis=-1) @ kernel.reshape(kh * kw * cin, cout)


class GroupNorm(nnx.Module):
  """Eq. 1 over NHWC (or [B, L, C]) inputs, torch.nn.GroupNorm's maths."""

  def __init__(self, channels: int, groups: int, *, eps: float, param_dtype):
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(_full((channels,), 1.0, param_dtype))
    self.bias = nnx.Param(_full((channels,), 0.0, param_dtype))

  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """Eq. 2 over the last axis (torch.nn.LayerNorm)."""

  def __init__(self, size: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(_full((size,), 1.0, param_dtype))
    self.bias = nnx.Param(_full((size,), 0.0, param_dtype))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
  """Eq. 5 (diffusers' ResnetBlock2D with time_embedding_norm "default"); temb_channels None:
  no time embedding (the VAE's blocks)."""

  def __init__(
      self,
      cin: int,
      cout: int,
      temb_channels: int | None,
      *,
      groups: int,
      eps: float,
      output_scale_factor: float = 1.0,
      key,
      dtype,
      param_dtype,
  ):
    k1, k2, kt, ks = split(key, 4)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(cin, groups, eps=eps, param_dtype=param_dtype)
    self.conv1 = Conv2d(cin, cout, key=k1, **kw)
    self.time_emb_proj = (
        Linear(temb_channels, cout, key=kt, **kw) if temb_channels is not None else None
    )
    self.norm2 = GroupNorm(cout, groups, eps=eps, param_dtype=param_dtype)
    self.conv2 = Conv2d(cout, cout, key=k2, **kw)
    self.conv_shortcut = Linear(cin, cout, key=ks, **kw) if cin != cout else None
    self.output_scale_factor = output_scale_factor

  def __call__(self, x, temb=None):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    out = skip.astype(h.dtype) + h
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
  """Eq. 6."""

  def __init__(self, channels: int, *, padding: int = 1, key, dtype, param_dtype):
    pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding), (padding, padding))
    self.conv = Conv2d(
        channels, channels, stride=2, padding=pad, key=key, dtype=dtype, param_dtype=param_dtype
    )

  def __call__(self, x):
    return self.conv(x)


def resize_nearest(x, size: tuple[int, int]):
  """torch's F.interpolate(mode="nearest") of NHWC x to spatial `size`: output row i reads
  input row floor(i * in / out)."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = jnp.minimum(jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32), h - 1)
  cols = jnp.minimum(jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32), w - 1)
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """Eq. 7; size: the output's spatial size (default twice the input's)."""

  def __init__(self, channels: int, *, key, dtype, param_dtype):
    self.conv = Conv2d(channels, channels, key=key, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, size: tuple[int, int] | None = None):
    size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
    return self.conv(resize_nearest(x, size))


def timestep_embedding(
    t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
  """Eq. 3: timesteps t [B] (int or float) -> [B, dim] float32."""
  half = dim // 2
  # The frequencies are constants, computed by numpy in float32 as torch does (XLA's exp
  # differs in the last bit, which t ~ 1000 amplifies to 1e-4 in the sines).
  exponent = -math.log(max_period) * np.arange(half, dtype=np.float32)
  freqs = np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32)
  args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Timesteps(nnx.Module):
  """Eq. 3 as a (parameter-free) module, diffusers' `Timesteps`."""

  def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float):
    self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

  def __call__(self, t):
    return timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nnx.Module):
  """Eq. 4."""

  def __init__(self, n_in: int, n_out: int, *, key, dtype, param_dtype):
    k1, k2 = split(key, 2)
    self.linear_1 = Linear(n_in, n_out, key=k1, dtype=dtype, param_dtype=param_dtype)
    self.linear_2 = Linear(n_out, n_out, key=k2, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Attention(nnx.Module):
  """Eq. 8 (diffusers' `Attention` without group norm); context_dim None: self-attention."""

  def __init__(
      self,
      query_dim: int,
      context_dim: int | None,
      heads: int,
      head_dim: int,
      *,
      bias: bool = False,
      upcast: bool = False,
      key,
      dtype,
      param_dtype,
  ):
    kq, kk, kv, ko = split(key, 4)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    inner, cdim = heads * head_dim, context_dim or query_dim
    self.to_q = Linear(query_dim, inner, key=kq, bias=bias, **kw)
    self.to_k = Linear(cdim, inner, key=kk, bias=bias, **kw)
    self.to_v = Linear(cdim, inner, key=kv, bias=bias, **kw)
    self.to_out = nnx.List([Linear(inner, query_dim, key=ko, **kw)])
    self.heads, self.upcast = heads, upcast

  def __call__(self, x, context=None):
    context = x if context is None else context.astype(x.dtype)
    q = split_heads(self.to_q(x), self.heads)
    k = split_heads(self.to_k(context), self.heads)
    v = split_heads(self.to_v(context), self.heads)
    return self.to_out[0](merge_heads(attention(q, k, v, upcast=self.upcast)))


class GEGLU(nnx.Module):
  """The gated half of eq. 9: u * gelu(g), [u, g] = proj(x)."""

  def __init__(self, n_in: int, n_out: int, *, key, dtype, param_dtype):
    self.proj = Linear(n_in, 2 * n_out, key=key, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    u, g = jnp.split(self.proj(x), 2, axis=-1)
    return u * jax.nn.gelu(g, approximate=False)


class Identity(nnx.Module):
  """A parameter-free placeholder (diffusers' dropout slot net.1 of FeedForward)."""

  def __call__(self, x):
    return x


class FeedForward(nnx.Module):
  """Eq. 9: net = [GEGLU(dim, 4 dim), dropout (identity at inference), Linear(4 dim, dim)]."""

  def __init__(self, dim: int, *, mult: int = 4, key, dtype, param_dtype):
    k1, k2 = split(key, 2)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    inner = dim * mult
    self.net = nnx.List(
        [GEGLU(dim, inner, key=k1, **kw), Identity(), Linear(inner, dim, key=k2, **kw)]
    )

  def __call__(self, x):
    for layer in self.net:
      x = layer(x)
    return x


class BasicTransformerBlock(nnx.Module):
  """Eq. 10 (diffusers' BasicTransformerBlock, norm_type "layer_norm", GEGLU)."""

  def __init__(
      self,
      dim: int,
      heads: int,
      head_dim: int,
      cross_attention_dim: int,
      *,
      only_cross_attention: bool = False,
      upcast: bool = False,
      key,
      dtype,
      param_dtype,
  ):
    k1, k2, k3 = split(key, 3)
    kw = dict(upcast=upcast, dtype=dtype, param_dtype=param_dtype)
    self.only_cross_attention = only_cross_attention
    self.norm1 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
    ctx1 = cross_attention_dim if only_cross_attention else None
    self.attn1 = Attention(dim, ctx1, heads, head_dim, key=k1, **kw)
    self.norm2 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
    self.attn2 = Attention(dim, cross_attention_dim, heads, head_dim, key=k2, **kw)
    self.norm3 = LayerNorm(dim, eps=1e-5, param_dtype=param_dtype)
    self.ff = FeedForward(dim, key=k3, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """Eq. 11 (diffusers' Transformer2DModel on continuous inputs, one block per layer)."""

  def __init__(
      self,
      channels: int,
      heads: int,
      cross_attention_dim: int,
      *,
      groups: int,
      num_layers: int = 1,
      use_linear_projection: bool = False,
      only_cross_attention: bool = False,
      upcast: bool = False,
      key,
      dtype,
      param_dtype,
  ):
    if channels % heads:
      raise ValueError(
          f"Transformer2DModel: {channels} channels are not divisible by {heads} heads"
      )
    ki, ko, *kb = split(key, 2 + num_layers)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = GroupNorm(channels, groups, eps=1e-6, param_dtype=param_dtype)
    # A 1x1 conv (use_linear_projection False) and a linear layer are the same map on NHWC;
    # only the checkpoint layout differs (torch_keys "conv1x1" vs "linear").
    self.proj_in = Linear(channels, channels, key=ki, **kw)
    self.transformer_blocks = nnx.List(
        [
            BasicTransformerBlock(
                channels,
                heads,
                channels // heads,
                cross_attention_dim,
                only_cross_attention=only_cross_attention,
                upcast=upcast,
                key=k,
                **kw,
            )
            for k in kb
        ]
    )
    self.proj_out = Linear(channels, channels, key=ko, **kw)

  def __call__(self, x, context):
    b, h, w, c = x.shape
    y = self.proj_in(self.norm(x).reshape(b, h * w, c))
    for block in self.transformer_blocks:
      y = block(y, context)
    return self.proj_out(y).reshape(b, h, w, c) + x


class VAEAttention(nnx.Module):
  """Eq. 12: diffusers' `Attention` as the VAE's mid block builds it (group norm, biased
  projections, residual connection), heads of `head_dim` channels (the VAE: one head)."""

  def __init__(
      self,
      channels: int,
      *,
      groups: int,
      eps: float,
      head_dim: int | None = None,
      rescale_output_factor: float = 1.0,
      key,
      dtype,
      param_dtype,
  ):
    kq, kk, kv, ko = split(key, 4)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.group_norm = GroupNorm(channels, groups, eps=eps, param_dtype=param_dtype)
    self.to_q = Linear(channels, channels, key=kq, **kw)
    self.to_k = Linear(channels, channels, key=kk, **kw)
    self.to_v = Linear(channels, channels, key=kv, **kw)
    self.to_out = nnx.List([Linear(channels, channels, key=ko, **kw)])
    self.heads = channels // (head_dim or channels)
    self.rescale_output_factor = rescale_output_factor

  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = (split_heads(p(y), self.heads) for p in (self.to_q, self.to_k, self.to_v))
    out = self.to_out[0](merge_heads(attention(q, k, v, upcast=True))).reshape(b, h, w, c)
    out = out + x
    return out if self.rescale_output_factor == 1 else out / self.rescale_output_factor
