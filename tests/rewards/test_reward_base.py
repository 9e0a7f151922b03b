"""Tests for alignjax.rewards.base: the Reward interface, input checks, evaluate_reward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.rewards import RANGE_TOLERANCE, Reward, check_prompts, evaluate_reward


def _sum_pixels(images, prompts):
  return jnp.sum(images, axis=(1, 2, 3))


def _host_sum(images, prompts):
  assert isinstance(images, np.ndarray), type(images)
  return images.reshape(images.shape[0], -1).sum(axis=1)


DIFF = Reward("sum", _sum_pixels, True)
HOST = Reward("host_sum", _host_sum, False)
IMAGES = np.random.default_rng(0).random((3, 4, 5, 1)).astype(np.float32)
EXPECTED = IMAGES.reshape(3, -1).sum(axis=1)


def test_reward_is_frozen_and_validates_fields():
  with pytest.raises(dataclasses.FrozenInstanceError):
    DIFF.name = "other"
  with pytest.raises(ValueError, match="non-empty string"):
    Reward("", _sum_pixels, True)
  with pytest.raises(TypeError, match="callable"):
    Reward("x", 3, True)
  with pytest.raises(TypeError, match="True or False"):
    Reward("x", _sum_pixels, 1)


@pytest.mark.parametrize("reward", [DIFF, HOST], ids=["differentiable", "host"])
@pytest.mark.parametrize("shape", [(4, 5, 1), (3, 4, 5, 4), (3, 1, 8, 8), (3, 4, 5, 1, 1)])
def test_bad_layout_names_expected_layout(reward, shape):
  with pytest.raises(ValueError, match=r"\[B, H, W, C\].*C in \{1, 3\}"):
    reward(np.zeros(shape, np.float32))


@pytest.mark.parametrize("reward", [DIFF, HOST], ids=["differentiable", "host"])
def test_integer_images_are_refused(reward):
  with pytest.raises(ValueError, match="floating point"):
    reward(np.zeros((2, 4, 4, 3), np.uint8))


@pytest.mark.parametrize("reward", [DIFF, HOST], ids=["differentiable", "host"])
def test_prompt_batch_length_must_match(reward):
  with pytest.raises(ValueError, match="batch length 2 but images have batch size 3"):
    reward(IMAGES, np.arange(2))
  with pytest.raises(ValueError, match="batch length 4"):
    reward(IMAGES, ["a", "b", "c", "d"])
  with pytest.raises(ValueError, match="leading batch dimension"):
    reward(IMAGES, 7)
  with pytest.raises(ValueError, match="batch length 2"):
    reward(IMAGES, {"ids": np.arange(3), "text": ["a", "b"]})
  # Matching lengths are accepted in every form.
  for prompts in (
      None,
      np.arange(3),
      ["a", "b", "c"],
      {"ids": jnp.arange(3), "t": ("a", "b", "c")},
  ):
    np.testing.assert_allclose(np.asarray(reward(IMAGES, prompts)), EXPECTED, rtol=1e-6)


def test_check_prompts_directly():
  check_prompts(np.zeros((5, 2)), 5)
  with pytest.raises(ValueError, match="batch length 5 but images have batch size 4"):
    check_prompts(np.zeros((5, 2)), 4)


def test_host_reward_rejects_nan_and_out_of_range_values():
  bad = IMAGES.copy()
  bad[1, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="1 NaN/inf"):
    HOST(bad)
  low = IMAGES.copy()
  low[0, 1, 2, 0] = -1.0
  with pytest.raises(ValueError, match=r"values in \[-1, .*expected .*\[0, 1\]"):
    HOST(low)
  high = IMAGES.copy()
  high[2, 3, 4, 0] = 1.5
  with pytest.raises(ValueError, match=r"values in \[.*, 1.5\]"):
    HOST(high)
  # Round-off inside the tolerance is accepted.
  edge = np.clip(IMAGES, 0, 1)
  edge[0, 0, 0, 0] = 1 + RANGE_TOLERANCE / 2
  HOST(edge)


def test_host_reward_gets_numpy_from_device_arrays():
  seen = {}

  def fn(images, prompts):
    seen["types"] = (type(images), type(prompts))
    return np.zeros(images.shape[0])

  out = Reward("probe", fn, False)(jnp.asarray(IMAGES), jnp.arange(3))
  assert seen["types"] == (np.ndarray, np.ndarray)
  assert out.dtype == np.float32 and isinstance(out, np.ndarray)


@pytest.mark.parametrize("differentiable", [True, False])
def test_wrong_output_shape_is_an_error(differentiable):
  reward = Reward("bad", lambda images, prompts: np.zeros((images.shape[0], 1)), differentiable)
  with pytest.raises(ValueError, match=r"one value per image, shape \(3,\); got shape \(3, 1\)"):
    reward(IMAGES)


def test_differentiable_reward_under_jit_and_grad():
  prompts = jnp.arange(3)
  jitted = jax.jit(DIFF)
  np.testing.assert_allclose(jitted(IMAGES, prompts), EXPECTED, rtol=1e-6)
  grad = jax.grad(lambda x: DIFF(x, prompts).sum())(jnp.asarray(IMAGES))
  np.testing.assert_array_equal(grad, np.ones_like(IMAGES))
  assert DIFF(IMAGES).dtype == jnp.float32


def test_jitted_method():
  jitted = DIFF.jitted()
  assert jitted.name == DIFF.name and jitted.differentiable
  np.testing.assert_allclose(jitted(IMAGES), EXPECTED, rtol=1e-6)
  with pytest.raises(ValueError, match="host reward"):
    HOST.jitted()


@pytest.mark.parametrize("reward", [DIFF, DIFF.jitted(), HOST], ids=["diff", "jitted", "host"])
def test_evaluate_reward_returns_host_float32(reward):
  for images in (IMAGES, jnp.asarray(IMAGES)):
    out = evaluate_reward(reward, images, np.arange(3))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, EXPECTED, rtol=1e-6)


def test_evaluate_reward_requires_a_reward():
  with pytest.raises(TypeError, match="expects a Reward"):
    evaluate_reward(_sum_pixels, IMAGES, None)


def test_host_reward_refuses_multiprocess_arrays(monkeypatch):
  class NotAddressable:
    is_fully_addressable = False

  monkeypatch.setattr(jax, "Array", NotAddressable)
  with pytest.raises(ValueError, match="process-local"):
    HOST(IMAGES, [NotAddressable(), 1, 2])
