"""Checksums of arrays computed on the device, for verified checkpoints.

Orbax's array format carries no checksum over the data, so `alignjax.checkpoint` records
two 32-bit sums of every saved array's raw bits and compares them after a restore:

    (1)  s₁ = Σᵢ bᵢ  mod 2³²
    (2)  s₂ = Σᵢ bᵢ · (2654435761 · i + 1)  mod 2³²

where bᵢ are the elements reinterpreted as unsigned integers of their own width (bool, 8 and
16 bits widened to 32; 64-bit elements as two 32-bit words) and i is the row-major position
of the word. Any single flipped bit changes s₁ (it adds ±2ᵏ, k < 32); s₂ also changes when
words are permuted. Integer addition mod 2³² is associative and commutative, so the sums are
the same for any sharding of the array and any reduction order: a checkpoint saved on one
mesh verifies on another, and every process of a multi-host job computes the same values.

`tree_checksums_and_finite(leaves)` computes (1)-(2) for a list of arrays and, in the same
device program, whether each floating leaf is finite; it returns small numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_MULTIPLIER = np.uint32(2654435761)  # Knuth's multiplicative-hash constant, odd


def _words(x: jax.Array) -> jax.Array:
  """The array's raw bits as uint32 words (bool and 8/16-bit widened, 64-bit split)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return _words(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def array_checksum(x: jax.Array) -> jax.Array:
  """Eqs. 1-2 of one array: uint32 [2]; jittable, sharding-independent."""
  words = _words(jnp.asarray(x))
  position = jnp.zeros(words.shape, jnp.uint32)
  stride = np.uint32(1)
  for axis in reversed(range(words.ndim)):  # row-major position without reshaping
    position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * stride
    stride = np.uint32((int(stride) * words.shape[axis]) % 2**32)
  weights = position * _MULTIPLIER + np.uint32(1)
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


def _is_inexact(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _device_sums(leaves):
  sums = [array_checksum(x) for x in leaves]
  finite = [jnp.all(jnp.isfinite(x)) if _is_inexact(x) else jnp.array(True) for x in leaves]
  return sums, finite


def tree_checksums_and_finite(leaves: Sequence) -> tuple[list[list[int]], list[bool]]:
  """([[s₁, s₂] per leaf], [finite per leaf]) for a list of arrays (numpy or jax)."""
  if not leaves:
    return [], []
  sums, finite = _device_sums(list(leaves))
  sums, finite = [_host(s) for s in sums], [_host(f) for f in finite]
  return [[int(a), int(b)] for a, b in sums], [bool(f) for f in finite]


def _host(x: jax.Array) -> np.ndarray:
  """A small replicated result on the host, also when the job spans several processes."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
