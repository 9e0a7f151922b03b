"""Image-statistics rewards (differentiable, for tests and toy alignment runs).

    (1)  brightness(x) = (1 / (H W C)) sum_{h, w, c} x[h, w, c]

the mean pixel value of each image, on the images' own [0, 1] scale (0 = all black,
1 = all white; not multiplied by 255). Its gradient w.r.t. every pixel is 1 / (H W C).
"""

from __future__ import annotations

import jax.numpy as jnp

from alignjax.rewards.base import Reward

__all__ = ["brightness"]


def _mean_pixel(images, prompts):
  del prompts  # brightness ignores metadata
  return jnp.mean(jnp.asarray(images, jnp.float32), axis=(1, 2, 3))  # eq. 1


def brightness() -> Reward:
  """Differentiable reward: mean pixel value per image in [0, 1] (eq. 1)."""
  return Reward(name="brightness", fn=_mean_pixel, differentiable=True)
