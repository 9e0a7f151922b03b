"""The `Reward` interface shared by every alignjax reward, and input checks.

A reward scores a batch of generated images, optionally using per-sample metadata:

    (1)  r = fn(images, prompts),   images: float [B, H, W, C] in [0, 1] (NHWC, C in {1, 3}),
                                    prompts: per-sample metadata with leading length B
                                             (for the digits model: int class ids [B]),
                                    r: float32 [B].

Two kinds exist, told apart by `Reward.differentiable`:

* differentiable rewards: `fn` is a pure, jittable JAX function; gradients d r / d images
  flow through it (DRaFT, Adjoint Matching). `Reward.__call__` only checks static facts
  (shapes, dtypes), so it can be called inside `jax.jit` and `jax.grad`.
* host rewards: `fn` is numpy code that runs on the host (e.g. JPEG encoding). Before it
  runs, `Reward.__call__` copies the inputs to the host (`jax.device_get`) and checks the
  values cheaply: every pixel finite and inside [0, 1] (to within `RANGE_TOLERANCE`).

`evaluate_reward` calls either kind and returns np.float32 [B], which is what a training
script needs for advantages and metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Reward", "RANGE_TOLERANCE", "evaluate_reward", "check_images", "check_prompts"]

# Host rewards accept pixels in [-RANGE_TOLERANCE, 1 + RANGE_TOLERANCE]: float round-off
# from a decoder is tolerated (the uint8 conversion clips it), real range errors are not.
RANGE_TOLERANCE = 1e-6

_LAYOUT = "a [B, H, W, C] image batch (NHWC) with C in {1, 3} and values in [0, 1]"


def check_images(images: Any, name: str = "reward") -> tuple[int, ...]:
  """Checks the static layout of an image batch; returns its shape.

  Works on numpy arrays, jax arrays and tracers (only shape and dtype are read).
  """
  shape = tuple(np.shape(images))
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(
        f"{name}: images must be {_LAYOUT}; got shape {shape}. "
        "Channels-first batches ([B, C, H, W]) must be transposed to [B, H, W, C]."
    )
  dtype = getattr(images, "dtype", None)
  if dtype is None:
    dtype = np.asarray(images).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{name}: images must be floating point in [0, 1]; got dtype {dtype}. "
        "Convert uint8 images with images.astype(np.float32) / 255."
    )
  return shape


def _leading_lengths(prompts: Any) -> list[int | None]:
  """Leading (batch) lengths of prompts: an array, a sequence, or a mapping of those."""
  if isinstance(prompts, Mapping):
    return [n for value in prompts.values() for n in _leading_lengths(value)]
  shape = getattr(prompts, "shape", None)
  if shape is not None:
    return [shape[0] if len(shape) >= 1 else None]
  if isinstance(prompts, (list, tuple)):
    return [len(prompts)]
  return [None]


def check_prompts(prompts: Any, batch_size: int, name: str = "reward") -> None:
  """Checks that prompts (metadata) have leading length `batch_size`; None is allowed."""
  if prompts is None:
    return
  for length in _leading_lengths(prompts):
    if length is None:
      raise ValueError(
          f"{name}: prompts must have a leading batch dimension of length {batch_size} "
          f"(an array [B, ...], a sequence of B items, or a mapping of those); "
          f"got {type(prompts).__name__} without one."
      )
    if length != batch_size:
      raise ValueError(
          f"{name}: prompts have batch length {length} but images have batch size "
          f"{batch_size}; they must match (one prompt per image)."
      )


def _check_host_values(images: np.ndarray, name: str) -> None:
  """Cheap host check: all pixels finite and in [0, 1] (to within RANGE_TOLERANCE)."""
  if not np.all(np.isfinite(images)):
    count = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
    raise ValueError(f"{name}: images contain {count} NaN/inf values; expected {_LAYOUT}.")
  if images.size == 0:
    return
  lo, hi = float(images.min()), float(images.max())
  if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
    raise ValueError(
        f"{name}: images have values in [{lo:.6g}, {hi:.6g}]; expected {_LAYOUT}. "
        "Diffusion samples x in [-1, 1] map to images with clip((x + 1) / 2, 0, 1)."
    )


def _to_host(tree: Any, name: str) -> Any:
  """jax.device_get with a clear error for arrays spread over several processes."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      raise ValueError(
          f"{name}: a host reward needs process-local inputs, but got a jax.Array sharded "
          "over several processes; pass this process's shards (its local batch) instead."
      )
  return jax.device_get(tree)


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named reward `fn(images, prompts) -> float32 [B]` (eq. 1).

  Attributes:
    name: short name used in metrics (e.g. "jpeg_compressibility").
    fn: the reward function. Differentiable: pure JAX, jittable. Host: numpy.
    differentiable: True if `fn` is a JAX function that can be differentiated and jitted.

  Calling a Reward validates its inputs (see the module docstring) and returns float32 [B]:
  a jax array for differentiable rewards, a numpy array for host rewards.
  """

  name: str
  fn: Callable[[Any, Any], Any]
  differentiable: bool

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Reward.name must be a non-empty string; got {self.name!r}.")
    if not callable(self.fn):
      raise TypeError(f"Reward {self.name!r}: fn must be callable; got {type(self.fn).__name__}.")
    if not isinstance(self.differentiable, bool):
      raise TypeError(
          f"Reward {self.name!r}: differentiable must be True or False; "
          f"got {self.differentiable!r}."
      )

  def __call__(self, images: Any, prompts: Any = None):
    label = f"reward {self.name!r}"
    shape = check_images(images, label)
    batch_size = shape[0]
    check_prompts(prompts, batch_size, label)
    if self.differentiable:
      out = jnp.asarray(self.fn(images, prompts))
    else:
      images = np.asarray(_to_host(images, label), dtype=np.float32)
      prompts = _to_host(prompts, label)
      _check_host_values(images, label)
      out = np.asarray(self.fn(images, prompts))
    if out.shape != (batch_size,):
      raise ValueError(
          f"{label}: fn must return one value per image, shape ({batch_size},); "
          f"got shape {out.shape}."
      )
    return out.astype(jnp.float32 if self.differentiable else np.float32)

  def jitted(self) -> "Reward":
    """The same differentiable reward with `fn` wrapped in `jax.jit`.

    Input checks stay outside the compiled function (they are static). Host rewards
    cannot be jitted and raise.
    """
    if not self.differentiable:
      raise ValueError(f"reward {self.name!r} is a host reward (numpy); it cannot be jitted.")
    return dataclasses.replace(self, fn=jax.jit(self.fn))


def evaluate_reward(reward: Reward, images: Any, prompts: Any = None) -> np.ndarray:
  """Evaluates either kind of reward and returns np.float32 [B] on the host.

  A differentiable reward is called as is (its `fn` may be plain or `jax.jit`-wrapped, see
  `Reward.jitted`) and its result fetched with `jax.device_get`; a host reward copies its
  inputs to the host and runs there. This blocks until the values are ready; to overlap a
  host reward with device work, use `HostRewardPool.submit` instead.
  """
  if not isinstance(reward, Reward):
    raise TypeError(f"evaluate_reward expects a Reward; got {type(reward).__name__}.")
  return np.asarray(jax.device_get(reward(images, prompts)), dtype=np.float32)
