"""Tests for alignjax.rewards.jpeg against sizes computed independently with Pillow."""

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from alignjax.rewards import evaluate_reward, jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb


def _reference_kb(image, quality, upscale):
  """Independent path: integer levels via putdata, PIL's own NEAREST resize, saved byte count."""
  height, width, channels = image.shape
  levels = (np.clip(image, 0, 1) * 255 + 0.5).astype(
      np.int64
  )  # half up; the one tie, 127.5, is 128 either way
  mode = "L" if channels == 1 else "RGB"
  pil = Image.new(mode, (width, height))
  if channels == 1:
    pil.putdata([int(v) for v in levels[..., 0].ravel()])
  else:
    pil.putdata([tuple(int(c) for c in px) for px in levels.reshape(-1, 3)])
  if upscale > 1:
    pil = pil.resize((width * upscale, height * upscale), Image.Resampling.NEAREST)
  out = io.BytesIO()
  pil.save(out, "JPEG", quality=quality)
  return len(out.getvalue()) / 1000


def _images(channels, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.random((4, 8, 8, channels)).astype(np.float32)
  images[0] = 0.5  # flat
  images[1, :, :4] = 0.0  # half dark: a single edge
  images[1, :, 4:] = 1.0
  return images


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("quality,upscale", [(95, 1), (95, 8), (50, 3)])
def test_matches_independent_pillow_encoding(channels, quality, upscale):
  images = _images(channels)
  expected = np.array([_reference_kb(im, quality, upscale) for im in images], np.float32)
  np.testing.assert_array_equal(jpeg_size_kb(images, quality, upscale), expected)
  comp = evaluate_reward(jpeg_compressibility(quality, upscale), jnp.asarray(images), None)
  incomp = evaluate_reward(jpeg_incompressibility(quality, upscale), images, np.arange(4))
  np.testing.assert_array_equal(comp, -expected)
  np.testing.assert_array_equal(incomp, expected)
  assert comp.dtype == np.float32


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("upscale", [1, 8])
def test_flat_compresses_better_than_noise(channels, upscale):
  images = _images(channels)
  comp = jpeg_compressibility(upscale=upscale)(images)
  incomp = jpeg_incompressibility(upscale=upscale)(images)
  assert comp[0] > comp[2] and comp[0] > comp[3]
  assert incomp[0] < incomp[2] and incomp[0] < incomp[3]
  np.testing.assert_array_equal(comp, -incomp)
  assert np.all(incomp > 0)


def test_size_unit_is_kilobytes_of_1000_bytes():
  image = _images(1)[2]
  buffer = io.BytesIO()
  Image.fromarray(np.round(image[..., 0] * 255).astype(np.uint8)).save(buffer, "JPEG", quality=95)
  assert jpeg_size_kb(image[None])[0] == np.float32(buffer.tell() / 1000)


def test_upscale_is_nearest_neighbour_before_encoding():
  images = _images(3)
  enlarged = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)
  np.testing.assert_array_equal(jpeg_size_kb(images, upscale=4), jpeg_size_kb(enlarged))


def test_lower_quality_gives_smaller_files_for_noise():
  noise = _images(3)[2:]
  assert np.all(jpeg_size_kb(noise, quality=30) < jpeg_size_kb(noise, quality=95))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quality": 0}, "quality must be an integer in 1..100"),
        ({"quality": 101}, "quality must be an integer in 1..100"),
        ({"quality": 95.0}, "quality must be an integer in 1..100"),
        ({"upscale": 0}, "upscale must be an integer >= 1"),
        ({"upscale": 2.5}, "upscale must be an integer >= 1"),
        ({"upscale": True}, "upscale must be an integer >= 1"),
    ],
)
def test_bad_settings(kwargs, match):
  for make in (jpeg_compressibility, jpeg_incompressibility):
    with pytest.raises(ValueError, match=match):
      make(**kwargs)
  with pytest.raises(ValueError, match=match):
    jpeg_size_kb(_images(1), **kwargs)


def test_bad_images():
  reward = jpeg_compressibility()
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    reward(_images(1) * 2 - 1)
  nan = _images(3)
  nan[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    reward(nan)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    reward(np.zeros((2, 8, 8, 2), np.float32))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    jpeg_size_kb(np.zeros((8, 8, 1), np.float32))
