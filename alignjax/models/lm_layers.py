"""Layers of the decoder-only LM (`alignjax.models.lm`): norms, rotary embedding, attention.

Shapes: B batch, L query length, S key length, H hidden, N query heads, K key/value heads
(N = K G for grouped-query attention), D head size, F MLP width. Kernels are stored in
[in..., out...] layout with the head axes explicit (q: [H, N, D], o: [N, D, H]) so that
sharding rules can split heads.

    RMSNorm:    y = x / sqrt(mean(x^2) + eps) * (c + w)    (c = 1 for Gemma, else 0)   (eq. 1)
    LayerNorm:  y = (x - mean x) / sqrt(var x + eps) * w + b                          (eq. 2)
    RoPE at position p, frequencies f [D/2], rotate_half([x1, x2]) = [-x2, x1]:
      a = p [f, f];  x' = x cos(a) + rotate_half(x) sin(a)                            (eq. 3)
    Attention (query head n uses key/value head n // G), in float32:
      s = scale q.k;   s <- cap tanh(s / cap) when capped;   p = softmax over allowed keys
      out = sum_k p_k v_k                                                             (eq. 4)
    MLP:  gated  down(act(gate x) * up x)      plain  down(act(up x))                 (eq. 5)

Norms, softmax and rotary angles are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.kernels import skinny_matmul
from alignjax.models.lm_config import LMConfig

_ACT = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def normal_init(key, shape, dtype, stddev: float = 0.02):
  """stddev * N(0, 1) of `shape`, drawn flat and reshaped (XLA on CPU compiles the sampler for
  a rank-3 shape several times slower than for a vector)."""
  n = 1
  for d in shape:
    n *= d
  return (stddev * jax.random.normal(key, (n,), dtype)).reshape(shape)


def dense_product(x, kernel, num_in: int):
  """x [..., in...] . kernel [in..., out...], contracting the `num_in` in-axes: a tensordot,
  or the skinny-matrix kernel inside its scope (`alignjax.kernels.skinny_matmul`)."""
  out_shape = kernel.shape[num_in:]
  w = kernel.reshape(math.prod(kernel.shape[:num_in]), math.prod(out_shape))
  lead = x.shape[: x.ndim - num_in]
  y = skinny_matmul.matmul(
      x.reshape(*lead, w.shape[0]), w, fallback=lambda *_: _tensordot(x, kernel, num_in)
  )
  return y.reshape(*lead, *out_shape)


def _tensordot(x, kernel, num_in: int):
  """x . kernel over the in-axes. On the CPU the leading axes of x are merged first: with
  [B, L, in] operands the weight gradient's backward pass copies a transposed activation
  gradient per layer, with [B·L, in] it does not (the same products, the same sums)."""
  if x.ndim - num_in <= 1 or jax.default_backend() != "cpu":
    return jnp.tensordot(x, kernel, axes=num_in)
  lead = x.shape[: x.ndim - num_in]
  flat = x.reshape((math.prod(lead),) + x.shape[x.ndim - num_in :])
  y = jnp.tensordot(flat, kernel, axes=num_in)
  return y.reshape(lead + y.shape[1:])


class Dense(nnx.Module):
  """y = x . kernel (+ bias), contracting the trailing `len(in_shape)` axes of x."""

  def __init__(
      self, in_shape, out_shape, *, bias: bool, dtype, rngs: nnx.Rngs, stddev: float = 0.02
  ):
    shape = tuple(in_shape) + tuple(out_shape)
    self.kernel = nnx.Param(normal_init(rngs.params(), shape, dtype, stddev))
    self.bias = nnx.Param(jnp.zeros(tuple(out_shape), dtype)) if bias else None
    self.num_in = len(in_shape)

  def __call__(self, x):
    y = dense_product(x, self.kernel[...], self.num_in)
    return y if self.bias is None else y + self.bias[...]


class Norm(nnx.Module):
  """RMSNorm (eq. 1) or LayerNorm (eq. 2) over the last axis."""

  def __init__(self, size: int, *, kind: str, eps: float, offset: float, dtype):
    self.kind, self.eps, self.offset = kind, eps, offset
    self.scale = nnx.Param(jnp.full((size,), 1.0 - offset, dtype))
    self.bias = nnx.Param(jnp.zeros((size,), dtype)) if kind == "layer" else None

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    if self.kind == "layer":
      xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    y = y * (self.offset + self.scale[...].astype(jnp.float32))
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def rope_sin_cos(positions, inv_freq):
  """positions [B, L] -> (sin, cos) [B, L, D] float32 (eq. 3)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x, sin, cos):
  """x [B, L, heads, D] rotated by eq. 3 (rotate-half convention, as in HF checkpoints)."""
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def attend(q, k, v, allowed, *, scale: float, softcap: float | None):
  """Grouped-query attention (eq. 4).

  q [B, L, N, D], k/v [B, K, S, D] (head-major, the KV cache layout: the key/value heads are
  batch axes of both products, so no per-step transpose of the cache), allowed [B, L, S]
  bool -> [B, L, N, D]. Rows with no allowed key (padding queries) get uniform weights
  instead of NaNs.
  """
  b, l, n, d = q.shape
  kv = k.shape[1]
  q = q.reshape(b, l, kv, n // kv, d)
  s = jnp.einsum("blkgd,bksd->bkgls", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(allowed[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkgls,bksd->blkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, l, n, d).astype(q.dtype)


class Attention(nnx.Module):
  """Multi-head attention with GQA, optional q/k RMSNorm (Qwen3), RoPE and a KV cache."""

  def __init__(self, c: LMConfig, *, dtype, rngs: nnx.Rngs):
    h, n, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    self.q = Dense((h,), (n, d), bias=c.qkv_bias, dtype=dtype, rngs=rngs)
    self.k = Dense((h,), (kv, d), bias=c.qkv_bias, dtype=dtype, rngs=rngs)
    self.v = Dense((h,), (kv, d), bias=c.qkv_bias, dtype=dtype, rngs=rngs)
    self.o = Dense((n, d), (h,), bias=c.o_bias, dtype=dtype, rngs=rngs)
    if c.qk_norm:
      self.q_norm = Norm(d, kind="rms", eps=c.norm_eps, offset=0.0, dtype=dtype)
      self.k_norm = Norm(d, kind="rms", eps=c.norm_eps, offset=0.0, dtype=dtype)
    else:
      self.q_norm = self.k_norm = None
    self.scale, self.softcap = c.attention_scale, c.attn_logit_softcap

  def __call__(self, x, allowed, rope, kv_cache=None, index=None):
    """x [B, L, H]; rope = (sin, cos) or None; kv_cache = (k [B,K,S,D], v) written at slots
    index .. index+L-1. Returns the output [B, L, H] and (k, v) [B, K, S, D]."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, L, D]
    if kv_cache is not None:
      ck, cv = kv_cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, index, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, index, 0))
    out = attend(q, k, v, allowed, scale=self.scale, softcap=self.softcap)
    return self.o(out), (k, v)


class MLP(nnx.Module):
  """Gated (SwiGLU/GeGLU) or plain two-layer MLP (eq. 5)."""

  def __init__(self, c: LMConfig, *, dtype, rngs: nnx.Rngs):
    h, f = c.hidden_size, c.mlp_dim
    self.gate = Dense((h,), (f,), bias=c.mlp_bias, dtype=dtype, rngs=rngs) if c.gated_mlp else None
    self.up = Dense((h,), (f,), bias=c.mlp_bias, dtype=dtype, rngs=rngs)
    self.down = Dense((f,), (h,), bias=c.mlp_bias, dtype=dtype, rngs=rngs)
    self.activation = c.activation

  def __call__(self, x):
    act = _ACT[self.activation]
    hidden = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
    return self.down(hidden)


class Block(nnx.Module):
  """Pre-norm residual block; Gemma 2 adds norms after attention and MLP:

  x <- x + post_attn_norm(attn(attn_norm(x)));  x <- x + post_mlp_norm(mlp(mlp_norm(x)))
  """

  def __init__(self, c: LMConfig, *, dtype, rngs: nnx.Rngs):
    def norm():
      return Norm(c.hidden_size, kind=c.norm, eps=c.norm_eps, offset=c.norm_offset, dtype=dtype)

    self.attn_norm = norm()
    self.attn = Attention(c, dtype=dtype, rngs=rngs)
    self.post_attn_norm = norm() if c.post_norms else None
    self.mlp_norm = norm()
    self.mlp = MLP(c, dtype=dtype, rngs=rngs)
    self.post_mlp_norm = norm() if c.post_norms else None

  def __call__(self, x, allowed, rope, kv_cache=None, index=None):
    y, kv = self.attn(self.attn_norm(x), allowed, rope, kv_cache, index)
    if self.post_attn_norm is not None:
      y = self.post_attn_norm(y)
    x = x + y
    y = self.mlp(self.mlp_norm(x))
    if self.post_mlp_norm is not None:
      y = self.post_mlp_norm(y)
    return x + y, kv
