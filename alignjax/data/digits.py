"""The embedded digits data set: scikit-learn's bundled 8x8 handwritten digits.

scikit-learn ships 1,797 grey-scale 8x8 images (pixel values 0..16, ten classes) inside the
package, so nothing is downloaded. Images are mapped to diffusion space and back with

    x      = 2 * (v / 16) - 1                 in [-1, 1]          (eq. 1)
    images = clip((x + 1) / 2, 0, 1)          in [0, 1]           (eq. 2)

and returned NHWC float32 [N, 8, 8, 1] with int32 labels. The train/test split is stratified
and deterministic: within each class, a fixed-seed permutation puts the first
round(TEST_FRACTION * n_c) examples into "test" and the rest into "train" (eq. 3), so the split
does not depend on the scikit-learn version's shuffling code.
"""

from __future__ import annotations

import functools

import numpy as np

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MAX_PIXEL = 16.0


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # local import: scikit-learn is slow to import

  bunch = load_digits()
  values = np.asarray(bunch.images, np.float32)  # [N, 8, 8], 0..16
  x = 2.0 * (values / MAX_PIXEL) - 1.0  # eq. 1
  x = x[..., None].astype(np.float32)
  labels = np.asarray(bunch.target, np.int32)
  x.setflags(write=False)
  labels.setflags(write=False)
  return x, labels


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
  """Stratified fixed-seed split (eq. 3); indices sorted ascending."""
  _, labels = _load_all()
  rng = np.random.default_rng(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    perm = rng.permutation(idx)
    n_test = int(round(TEST_FRACTION * len(idx)))
    test.append(perm[:n_test])
  test_idx = np.sort(np.concatenate(test))
  train_mask = np.ones(len(labels), bool)
  train_mask[test_idx] = False
  return {
      "train": np.flatnonzero(train_mask),
      "test": test_idx,
      "all": np.arange(len(labels)),
  }


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (x [N, 8, 8, 1] float32 in [-1, 1] (eq. 1), labels [N] int32) for `split`.

  split is "train" (1,438 images), "test" (359 images) or "all" (1,797 images).
  Returned arrays are fresh copies (safe to modify).
  """
  if split not in SPLITS:
    raise ValueError(f"load_digits_split: unknown split {split!r}; valid choices: {SPLITS}")
  x, labels = _load_all()
  idx = _split_indices()[split]
  return x[idx].copy(), labels[idx].copy()


def to_images(x):
  """Diffusion-space samples in [-1, 1] -> images in [0, 1] (eq. 2). numpy or jax arrays."""
  if isinstance(x, np.ndarray):
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)
  import jax.numpy as jnp

  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def from_images(images):
  """Images in [0, 1] -> diffusion space [-1, 1] (inverse of eq. 2 on [0, 1])."""
  return 2.0 * images - 1.0
