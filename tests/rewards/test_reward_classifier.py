"""Tests for alignjax.rewards.classifier against an independent numpy log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax.rewards import class_log_prob, classifier_log_prob, evaluate_reward

RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(size=(64, 10)).astype(np.float32)
BIAS = RNG.normal(size=(10,)).astype(np.float32)
IMAGES = RNG.random((5, 8, 8, 1)).astype(np.float32)
CLASSES = np.array([3, 0, 9, 3, 7], np.int32)


def linear_logits(images):
  return jnp.reshape(images, (images.shape[0], -1)) @ WEIGHTS + BIAS


def numpy_log_softmax(images):
  logits = images.reshape(len(images), -1).astype(np.float64) @ WEIGHTS + BIAS
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_prompt_classes():
  expected = numpy_log_softmax(IMAGES)[np.arange(5), CLASSES]
  reward = classifier_log_prob(linear_logits)
  assert reward.differentiable and reward.name == "classifier_log_prob"
  np.testing.assert_allclose(reward(IMAGES, CLASSES), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reward(IMAGES, list(CLASSES)), expected, rtol=1e-5, atol=1e-5)
  jitted = jax.jit(reward)
  np.testing.assert_allclose(jitted(IMAGES, jnp.asarray(CLASSES)), expected, rtol=1e-5, atol=1e-5)
  out = evaluate_reward(reward.jitted(), jnp.asarray(IMAGES), CLASSES)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_fixed_target_ignores_prompts():
  expected = numpy_log_softmax(IMAGES)[:, 4]
  reward = classifier_log_prob(linear_logits, target=4)
  assert reward.name == "classifier_log_prob_4"
  np.testing.assert_allclose(reward(IMAGES, CLASSES), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reward(IMAGES), expected, rtol=1e-5, atol=1e-5)


def test_gradient_matches_closed_form():
  # d/dx log softmax(W^T x + b)_y = W[:, y] - sum_k p_k W[:, k].
  reward = classifier_log_prob(linear_logits)
  grad = jax.jit(jax.grad(lambda x: reward(x, CLASSES).sum()))(IMAGES)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  probs = np.exp(numpy_log_softmax(IMAGES))
  expected = WEIGHTS[:, CLASSES].T - probs @ WEIGHTS.T
  np.testing.assert_allclose(np.reshape(grad, (5, 64)), expected, rtol=1e-4, atol=1e-5)


def test_nnx_classifier_with_params_as_step_arguments():
  model = nnx.Linear(64, 10, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  @jax.jit
  def step(params, images, classes):
    logits_fn = lambda im: nnx.merge(graphdef, params)(im.reshape(im.shape[0], -1))
    reward = classifier_log_prob(logits_fn)
    return jax.value_and_grad(lambda x: reward(x, classes).sum())(images)

  value, grad = step(params, IMAGES, CLASSES)
  logits = IMAGES.reshape(5, -1) @ np.asarray(params["kernel"][...]) + np.asarray(
      params["bias"][...]
  )
  expected = jax.nn.log_softmax(logits)[np.arange(5), CLASSES].sum()
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("target", [10, -1, 3.0, True])
def test_target_range_is_checked(target):
  with pytest.raises(ValueError, match=r"0\.\.9"):
    classifier_log_prob(linear_logits, target=target)


def test_target_range_follows_num_classes():
  with pytest.raises(ValueError, match=r"valid class ids are 0\.\.4"):
    classifier_log_prob(linear_logits, target=5, num_classes=5)
  with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
    classifier_log_prob(linear_logits, num_classes=1)


def test_bad_prompts_and_logits():
  reward = classifier_log_prob(linear_logits)
  with pytest.raises(
      ValueError, match=r"class ids \[-2, 10\] are out of range; valid class ids are 0\.\.9"
  ):
    reward(IMAGES, np.array([10, 0, -2, 1, 1]))
  with pytest.raises(ValueError, match="got None"):
    reward(IMAGES, None)
  with pytest.raises(ValueError, match="int class ids"):
    reward(IMAGES, CLASSES.astype(np.float32))
  with pytest.raises(ValueError, match="batch length 4"):
    reward(IMAGES, CLASSES[:4])
  with pytest.raises(ValueError, match=r"logits \[B, 10\] = \[5, 10\]; got shape \(5, 7\)"):
    classifier_log_prob(lambda im: linear_logits(im)[:, :7])(IMAGES, CLASSES)
  with pytest.raises(TypeError, match="callable"):
    classifier_log_prob(WEIGHTS)


def test_traced_out_of_range_ids_give_nan():
  reward = jax.jit(classifier_log_prob(linear_logits))
  out = reward(IMAGES, jnp.array([10, 0, 1, 2, 3]))
  assert np.isnan(out[0]) and np.all(np.isfinite(out[1:]))


def test_class_log_prob():
  logits = np.array([[0.0, np.log(3.0)], [2.0, 2.0]], np.float32)
  np.testing.assert_allclose(
      class_log_prob(logits, np.array([1, 0])), [np.log(0.75), np.log(0.5)], rtol=1e-6
  )
