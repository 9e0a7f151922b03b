"""Tests of the embedded digits data set (alignjax.data.digits)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from alignjax.data import digits


def test_splits_shapes_dtypes_and_range():
  for split, n in (("train", 1438), ("test", 359), ("all", 1797)):
    x, y = digits.load_digits_split(split)
    assert x.shape == (n, 8, 8, 1) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_values_match_sklearn_pixels():
  """eq. 1 re-derived from scikit-learn's raw 0..16 pixels, example by example."""
  raw = load_digits()
  x, y = digits.load_digits_split("all")
  np.testing.assert_array_equal(y, raw.target)
  np.testing.assert_allclose(x[..., 0], raw.images / 8.0 - 1.0, atol=1e-7)


def test_split_is_a_stratified_deterministic_partition():
  x_tr, y_tr = digits.load_digits_split("train")
  x_te, y_te = digits.load_digits_split("test")
  x_all, y_all = digits.load_digits_split("all")
  # Partition of the 1,797 examples (compare label+pixels as multisets).
  pairs = lambda x, y: sorted(zip(y.tolist(), [r.tobytes() for r in x.reshape(len(x), -1)]))
  assert pairs(np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])) == pairs(x_all, y_all)
  # Stratified: every class has round(20%) of its examples in test.
  counts = np.bincount(y_all, minlength=10)
  np.testing.assert_array_equal(np.bincount(y_te, minlength=10), np.round(0.2 * counts))
  # Deterministic: a second call returns the same arrays; returned arrays are copies.
  x2, y2 = digits.load_digits_split("test")
  np.testing.assert_array_equal(x2, x_te)
  np.testing.assert_array_equal(y2, y_te)
  x2[0] = 5.0
  assert digits.load_digits_split("test")[0][0].max() <= 1.0


def test_bad_split_names_choices():
  with pytest.raises(ValueError, match=r"'validation'.*train.*test"):
    digits.load_digits_split("validation")


def test_to_images_and_back():
  x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)
  np.testing.assert_allclose(digits.to_images(x), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
  import jax.numpy as jnp

  np.testing.assert_allclose(
      np.asarray(digits.to_images(jnp.asarray(x))), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
  )
  np.testing.assert_allclose(digits.from_images(digits.to_images(x[1:5])), x[1:5])
