"""Tests for alignjax.rewards.statistics (brightness) with hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.rewards import brightness, evaluate_reward


def test_brightness_exact_values():
  images = np.zeros((3, 2, 2, 1), np.float32)
  images[1] = 1.0
  images[2, :, :, 0] = [[0.0, 0.25], [0.5, 1.0]]  # mean (0 + .25 + .5 + 1) / 4 = 0.4375
  reward = brightness()
  assert reward.differentiable and reward.name == "brightness"
  out = evaluate_reward(reward, images, None)
  np.testing.assert_array_equal(out, np.array([0.0, 1.0, 0.4375], np.float32))


def test_brightness_rgb_averages_channels_and_jits():
  images = np.zeros((1, 1, 2, 3), np.float32)
  images[0, 0, 0] = [1.0, 0.5, 0.0]  # sum 1.5 over 6 values -> 0.25
  out = jax.jit(brightness())(jnp.asarray(images), jnp.arange(1))
  np.testing.assert_array_equal(out, np.array([0.25], np.float32))


def test_brightness_gradient_is_one_over_pixel_count():
  images = jnp.full((2, 4, 3, 3), 0.3)
  grad = jax.grad(lambda x: brightness()(x).sum())(images)
  np.testing.assert_allclose(grad, np.full(images.shape, 1 / 36), rtol=1e-6)
