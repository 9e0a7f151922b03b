"""Multi-head attention for the Stable Diffusion components, in one place.

Shapes: B batch, L query length, S key length, N heads, D head size.

    out = softmax(scale q k^T + bias) v,   scale = 1 / sqrt(D) unless given          (eq. 1)

`causal=True` masks keys after the query (CLIP's text encoder). `upcast=True` computes the
scores and softmax in float32 (diffusers' `upcast_attention`, SD 2.x); otherwise they are
computed in the inputs' dtype as diffusers does. The computation goes through
`jax.nn.dot_product_attention`, which picks cuDNN's fused (flash) kernel on GPUs where the
dtype and shapes allow and XLA's program elsewhere.

On the CPU, long unmasked attention (the UNet's self-attention over 32 x 32 = 1024 or 64 x 64 =
4096 latent positions) runs instead one head at a time, in blocks of `QUERY_BLOCK` queries:
eq. 1 for each block's rows with its [QUERY_BLOCK, S] scores kept in cache (a `lax.map` over
the B N heads, and in each a `lax.map` over the blocks). XLA:CPU's single program for the whole
[B, N, L, S] score tensor is far slower there (2-core EPYC, B 2, N 8, D 40, float32; L = S =
1024: 166-187 ms, 128-query blocks over all heads at once 55-57 ms, one head at a time in
256-query blocks 35 ms; L = S = 4096: 3058, 1412 and 523 ms). Short keys (cross-attention over
77 text tokens) keep XLA's program. GPU and TPU programs are untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    mask: jax.Array | None = None,
    scale: float | None = None,
    upcast: bool = False,
) -> jax.Array:
  """q [B, L, N, D], k and v [B, S, N, D] -> [B, L, N, D] (eq. 1).

  mask: boolean, broadcastable to [B, N, L, S], True where a key may be attended.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
    raise ValueError(
        f"attention: expected q [B, L, N, D] and k, v [B, S, N, D]; got {q.shape}, {k.shape}, "
        f"{v.shape}"
    )
  dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if _blocked_applies(q, k, mask, causal):
    out = _blocked_attention(q, k, v, scale)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal)
  return out.astype(dtype)


QUERY_BLOCK = 256


def _blocked_applies(q, k, mask, causal: bool) -> bool:
  length, keys = q.shape[1], k.shape[1]
  return (
      jax.default_backend() == "cpu"
      and mask is None
      and not causal
      and min(length, keys) >= 4 * QUERY_BLOCK
      and length % QUERY_BLOCK == 0
  )


def _blocked_attention(q, k, v, scale):
  """Eq. 1 one head at a time, in blocks of QUERY_BLOCK queries (module docstring); same shapes
  as `attention`."""
  b, length, n, d = q.shape
  scale = d**-0.5 if scale is None else scale
  q, k, v = (x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], d) for x in (q, k, v))
  blocks = q.reshape(b * n, length // QUERY_BLOCK, QUERY_BLOCK, d)

  def one_head(head):
    qh, kh, vh = head  # [L / QUERY_BLOCK, QUERY_BLOCK, D], [S, D], [S, D]

    def one_block(qb):
      s = jnp.matmul(qb * jnp.asarray(scale, qb.dtype), kh.T)
      e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
      return jnp.matmul(e, vh) / jnp.sum(e, axis=-1, keepdims=True)

    return jax.lax.map(one_block, qh)

  out = jax.lax.map(one_head, (blocks, k, v))  # [B N, L / QUERY_BLOCK, QUERY_BLOCK, D]
  return out.reshape(b, n, length, d).transpose(0, 2, 1, 3)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, N*D] -> [B, T, N, D]."""
  b, t, c = x.shape
  if c % num_heads:
    raise ValueError(f"split_heads: width {c} is not divisible by {num_heads} heads")
  return x.reshape(b, t, num_heads, c // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """[B, T, N, D] -> [B, T, N*D]."""
  b, t, n, d = x.shape
  return x.reshape(b, t, n * d)
