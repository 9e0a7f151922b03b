"""A small CNN classifier for the embedded 8x8 digits (reward model and sample evaluator).

Architecture (images u in [0, 1], [B, 8, 8, 1]; widths c1, c2 from `ClassifierConfig`):

    h0 = 2u - 1                                                   (centre the input)
    h1 = silu(GN(conv3x3_{c1}(h0)))                    [B, 8, 8, c1]
    h2 = silu(GN(conv3x3_{c2}, stride 2 (h1)))         [B, 4, 4, c2]
    h3 = silu(GN(conv3x3_{c2}, stride 2 (h2)))         [B, 2, 2, c2]
    logits = W_2 silu(W_1 flatten(h3) + b_1) + b_2     [B, 10]                    (eq. 1)

Training minimises the mean softmax cross-entropy with AdamW (eq. 2),

    L(theta) = -1/B sum_i log softmax(logits_theta(u_i))[y_i],                    (eq. 2)

on images augmented by a random shift of up to `max_shift` pixels (zero padded) and small
Gaussian pixel noise, so that the classifier also scores imperfect generated samples sensibly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax.models import io


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Hyper-parameters of `DigitsClassifier`."""

  image_size: int = 8
  in_channels: int = 1
  channels: tuple[int, ...] = (32, 64)  # (c1, c2) of eq. 1
  hidden_dim: int = 128
  num_groups: int = 8
  num_classes: int = 10

  def __post_init__(self):
    if len(self.channels) != 2:
      raise ValueError(f"ClassifierConfig: channels={self.channels} must have two widths")
    for c in self.channels:
      if c <= 0 or c % self.num_groups:
        raise ValueError(
            f"ClassifierConfig: channels={self.channels} must be positive multiples"
            f" of num_groups={self.num_groups}"
        )
    if self.image_size % 4:
      raise ValueError(f"ClassifierConfig: image_size={self.image_size} must be divisible by 4")
    for name in ("hidden_dim", "num_classes", "in_channels"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ClassifierConfig: {name}={getattr(self, name)} must be > 0")

  def to_dict(self) -> dict:
    return io.config_to_dict(self)

  @classmethod
  def from_dict(cls, d) -> "ClassifierConfig":
    return io.config_from_dict(cls, d)


class DigitsClassifier(nnx.Module):
  """`__call__(images in [0, 1] [B, 8, 8, 1]) -> logits [B, num_classes]` (eq. 1)."""

  MODEL_TYPE = "alignjax_digits_classifier"

  def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
    self.config = config
    c1, c2 = config.channels
    g = config.num_groups
    self.conv1 = nnx.Conv(config.in_channels, c1, (3, 3), padding="SAME", rngs=rngs)
    self.norm1 = nnx.GroupNorm(c1, num_groups=g, rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
    self.norm2 = nnx.GroupNorm(c2, num_groups=g, rngs=rngs)
    self.conv3 = nnx.Conv(c2, c2, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
    self.norm3 = nnx.GroupNorm(c2, num_groups=g, rngs=rngs)
    flat = (config.image_size // 4) ** 2 * c2
    self.fc1 = nnx.Linear(flat, config.hidden_dim, rngs=rngs)
    self.fc2 = nnx.Linear(config.hidden_dim, config.num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(
          f"DigitsClassifier: images have shape {images.shape}; expected "
          f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.in_channels}] in [0, 1]"
      )
    h = 2.0 * images - 1.0
    h = jax.nn.silu(self.norm1(self.conv1(h)))
    h = jax.nn.silu(self.norm2(self.conv2(h)))
    h = jax.nn.silu(self.norm3(self.conv3(h)))
    h = h.reshape(h.shape[0], -1)
    return self.fc2(jax.nn.silu(self.fc1(h)))  # eq. 1


def augment(
    images: jax.Array, key: jax.Array, *, max_shift: int = 1, noise_std: float = 0.05
) -> jax.Array:
  """Random integer shift in [-max_shift, max_shift]^2 (zero padded) plus N(0, noise_std^2)."""
  b, h, w, _ = images.shape
  k_shift, k_noise = jax.random.split(key)
  if max_shift > 0:
    shifts = jax.random.randint(k_shift, (b, 2), -max_shift, max_shift + 1)
    pad = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))

    def crop(img, s):
      return jax.lax.dynamic_slice(
          img, (max_shift - s[0], max_shift - s[1], 0), (h, w, img.shape[-1])
      )

    images = jax.vmap(crop)(pad, shifts)
  if noise_std > 0:
    images = images + noise_std * jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.clip(images, 0.0, 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy (eq. 2)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def train_classifier(
    model: DigitsClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 1,
    noise_std: float = 0.05,
    seed: int = 0,
    key: jax.Array | None = None,
    callback=None,
) -> tuple[DigitsClassifier, list[float]]:
  """Trains `model` on (images in [0, 1], labels) with AdamW (eq. 2); returns (model, losses).

  One jitted, donated step; batches are drawn inside the step (uniform with replacement) from
  the full data set held on device, with PRNG `key` (default `jax.random.key(seed)`).
  `losses` holds the loss every 100 steps and at the end; `callback(step, loss)` sees each.
  """
  if steps <= 0 or batch_size <= 0:
    raise ValueError(f"train_classifier: steps={steps} and batch_size={batch_size} must be > 0")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"train_classifier: {images.shape[0]} images but {labels.shape[0]} labels")
  graphdef, params = nnx.split(model)
  schedule = optax.cosine_decay_schedule(learning_rate, steps)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = tx.init(params)

  def _step(params, opt_state, key):
    k_idx, k_aug = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
    batch = augment(images[idx], k_aug, max_shift=max_shift, noise_std=noise_std)

    def loss_fn(p):
      return cross_entropy(nnx.merge(graphdef, p)(batch), labels[idx])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step_fn = jax.jit(_step, donate_argnums=(0, 1))
  key = jax.random.key(seed) if key is None else key
  losses = []
  for step in range(steps):
    params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(key, step))
    if (step + 1) % 100 == 0 or step + 1 == steps:
      losses.append(float(loss))
      if callback is not None:
        callback(step + 1, losses[-1])
  return nnx.merge(graphdef, params), losses


_apply = nnx.jit(lambda model, images: model(images))


def predict(model: DigitsClassifier, images, *, batch_size: int = 512) -> np.ndarray:
  """Arg-max class of each image in [0, 1] (host numpy int32 [N]).

  Images go through in chunks of `batch_size`, the last one zero-padded, so that every call
  reuses one compiled shape.
  """
  images = np.asarray(images, np.float32)
  out = []
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    logits = _apply(model, jnp.asarray(chunk))
    out.append(np.asarray(jnp.argmax(logits, axis=-1))[: batch_size - pad])
  return np.concatenate(out).astype(np.int32)


def accuracy(model: DigitsClassifier, images, labels) -> float:
  """Fraction of images in [0, 1] whose arg-max class equals `labels`."""
  return float(np.mean(predict(model, images) == np.asarray(labels)))
