"""JPEG compressibility and incompressibility (the DDPO paper's host rewards).

Each image is quantised, optionally enlarged, and encoded with Pillow's JPEG encoder:

    (1)  u = round(clip(x, 0, 1) * 255)  as uint8            (x: one image [H, W, C] in [0, 1])
    (2)  u' = nearest-neighbour upscale of u by an integer factor s: u'[i, j] = u[i // s, j // s]
    (3)  size_kB = len(JPEG(u', quality)) / 1000              (kilobytes, 1 kB = 1000 bytes)
    (4)  compressibility   = -size_kB
    (5)  incompressibility = +size_kB

C = 1 is encoded as a grayscale ("L") JPEG and C = 3 as "RGB" (Pillow's default chroma
subsampling). The file size includes the JPEG headers and tables (about a third of a kB),
so even a flat image has a nonzero size; what the rewards compare is how the size changes
with content.

Why `upscale`: the embedded digits are 8 x 8, one JPEG block, so their encoded sizes differ
by only a few bytes. Enlarging each pixel to s x s (eq. 2; s = 8 gives 64 x 64) leaves the
picture the same but spreads edges over many 8 x 8 blocks, so sizes vary meaningfully
with content. upscale = 1 (no enlarging) is right for images that are already large.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from alignjax.rewards.base import Reward

__all__ = ["jpeg_size_kb", "jpeg_compressibility", "jpeg_incompressibility"]


def _check_settings(quality: int, upscale: int) -> None:
  if (
      isinstance(quality, bool)
      or not isinstance(quality, (int, np.integer))
      or not 1 <= quality <= 100
  ):
    raise ValueError(f"JPEG quality must be an integer in 1..100 (95 is DDPO's); got {quality!r}.")
  if isinstance(upscale, bool) or not isinstance(upscale, (int, np.integer)) or upscale < 1:
    raise ValueError(f"JPEG upscale must be an integer >= 1 (1 = no enlarging); got {upscale!r}.")


def _to_uint8(image: np.ndarray, upscale: int) -> np.ndarray:
  """Eqs. 1-2: [H, W, C] float in [0, 1] -> uint8 [H*s, W*s] (C = 1) or [H*s, W*s, 3]."""
  pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  if upscale > 1:
    pixels = np.repeat(np.repeat(pixels, upscale, axis=0), upscale, axis=1)
  return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def jpeg_size_kb(images: np.ndarray, quality: int = 95, upscale: int = 1) -> np.ndarray:
  """Encoded JPEG size in kilobytes (bytes / 1000) of each image (eqs. 1-3).

  Args:
    images: float [B, H, W, C] in [0, 1], C in {1, 3}, on the host.
    quality: Pillow JPEG quality, 1..100.
    upscale: integer nearest-neighbour enlargement factor applied before encoding.
  Returns:
    np.float32 [B].
  """
  _check_settings(quality, upscale)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"jpeg_size_kb: images must be [B, H, W, C] with C in {{1, 3}}; got {images.shape}."
    )
  sizes = np.empty((images.shape[0],), dtype=np.float32)
  for i, image in enumerate(images):
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image, upscale)).save(buffer, format="JPEG", quality=int(quality))
    sizes[i] = buffer.getbuffer().nbytes / 1000.0  # eq. 3
  return sizes


def jpeg_compressibility(quality: int = 95, upscale: int = 1) -> Reward:
  """Host reward -size_kB (eq. 4): smaller JPEG files score higher."""
  _check_settings(quality, upscale)
  return Reward(
      name="jpeg_compressibility",
      fn=lambda images, prompts: -jpeg_size_kb(images, quality, upscale),
      differentiable=False,
  )


def jpeg_incompressibility(quality: int = 95, upscale: int = 1) -> Reward:
  """Host reward +size_kB (eq. 5): larger JPEG files score higher."""
  _check_settings(quality, upscale)
  return Reward(
      name="jpeg_incompressibility",
      fn=lambda images, prompts: jpeg_size_kb(images, quality, upscale),
      differentiable=False,
  )
