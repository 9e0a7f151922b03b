"""Multi-head attention for the Stable Diffusion components, in one place.

Shapes: B batch, L query length, S key length, N heads, D head size.

    out = softmax(scale q k^T + bias) v,   scale = 1 / sqrt(D) unless given          (eq. 1)

`causal=True` masks keys after the query (CLIP's text encoder). `upcast=True` computes the
scores and softmax in float32 (diffusers' `upcast_attention`, SD 2.x); otherwise they are
computed in the inputs' dtype as diffusers does. The computation goes through
`jax.nn.dot_product_attention`, which picks cuDNN's fused (flash) kernel on GPUs where the
dtype and shapes allow and XLA's program elsewhere.
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
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal)
  return out.astype(dtype)


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
