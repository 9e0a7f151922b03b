"""Tests of the digits classifier (alignjax.models.classifier)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import testing
from alignjax.data import digits
from alignjax.models import classifier as clf_lib


def test_logits_shape_and_batch_independence():
  model = testing.tiny_classifier(seed=0)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(5, 8, 8, 1)), jnp.float32)
  apply = nnx.jit(lambda m, x: m(x))
  logits = np.asarray(apply(model, x))
  assert logits.shape == (5, 10) and np.all(np.isfinite(logits))
  np.testing.assert_allclose(np.asarray(apply(model, x[2:3]))[0], logits[2], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"expected \[B, 8, 8, 1\]"):
    model(jnp.zeros((2, 8, 8)))


def test_cross_entropy_matches_numpy():
  logits = np.random.default_rng(1).normal(size=(6, 10)).astype(np.float32)
  labels = np.array([0, 3, 9, 1, 1, 5], np.int32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = -np.mean(np.log(p[np.arange(6), labels]))  # eq. 2
  np.testing.assert_allclose(
      float(clf_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))), want, rtol=1e-5
  )


_augment = jax.jit(clf_lib.augment, static_argnames=("max_shift", "noise_std"))


def test_augment_shifts_by_at_most_one_pixel():
  img = np.zeros((64, 8, 8, 1), np.float32)
  img[:, 3, 4, 0] = 1.0
  out = np.asarray(_augment(jnp.asarray(img), jax.random.key(0), max_shift=1, noise_std=0.0))
  for o in out:
    rows, cols = np.nonzero(o[..., 0] == 1.0)
    assert len(rows) == 1 and o.sum() == 1.0
    assert abs(rows[0] - 3) <= 1 and abs(cols[0] - 4) <= 1
  assert len({np.argmax(o) for o in out}) > 1  # shifts actually vary
  noisy = np.asarray(_augment(jnp.asarray(img), jax.random.key(0), max_shift=0, noise_std=0.1))
  assert noisy.min() >= 0.0 and noisy.max() <= 1.0 and not np.array_equal(noisy, img)


def test_short_training_learns_digits():
  x, y = digits.load_digits_split("train")
  xt, yt = digits.load_digits_split("test")
  model = testing.tiny_classifier(seed=0)
  before = clf_lib.accuracy(model, digits.to_images(xt), yt)
  model, losses = clf_lib.train_classifier(
      model, digits.to_images(x), y, steps=200, batch_size=64, learning_rate=1e-2
  )
  after = clf_lib.accuracy(model, digits.to_images(xt), yt)
  assert losses[-1] < losses[0] and after > 0.75 > before
  preds = clf_lib.predict(model, digits.to_images(xt[:7]))
  assert preds.shape == (7,) and preds.dtype == np.int32
  with pytest.raises(ValueError, match="steps=0"):
    clf_lib.train_classifier(model, digits.to_images(x), y, steps=0)


def test_config_round_trip_and_refusals():
  cfg = clf_lib.ClassifierConfig(channels=(16, 32), hidden_dim=64)
  assert clf_lib.ClassifierConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match=r"unknown config field.*\['depth'\]"):
    clf_lib.ClassifierConfig.from_dict({**cfg.to_dict(), "depth": 3})
  with pytest.raises(ValueError, match="two widths"):
    clf_lib.ClassifierConfig(channels=(8, 8, 8))
