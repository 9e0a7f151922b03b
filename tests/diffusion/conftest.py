"""Tiny noise predictors shared by the sampler tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

NUM_CLASSES = 10  # class ids 0..9; 10 is the null condition


class LinearEps:
  """eps(x, t, c) = tanh(x W + bias[c] + (t / N) v): a random per-pixel channel mixer.

  `jax(x, t, c)` and `numpy(x, t, c)` (float64) compute the same function.
  """

  def __init__(self, channels: int, num_train_timesteps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.w = rng.normal(size=(channels, channels)) / np.sqrt(channels)
    self.bias = 0.5 * rng.normal(size=(NUM_CLASSES + 1, channels))
    self.v = rng.normal(size=(channels,))
    self.n = num_train_timesteps

  def params(self):
    return {k: jnp.asarray(getattr(self, k), jnp.float32) for k in ("w", "bias", "v")}

  def apply(self, params, x, t, c):
    tt = (jnp.asarray(t, jnp.float32) / self.n)[:, None, None, None]
    return jnp.tanh(
        jnp.einsum("bhwc,cd->bhwd", x, params["w"])
        + params["bias"][c][:, None, None, :]
        + tt * params["v"]
    )

  def jax(self, x, t, c):
    return self.apply(self.params(), x, t, c)

  def numpy(self, x, t, c):
    tt = (np.asarray(t, np.float64) / self.n)[:, None, None, None]
    return np.tanh(
        np.einsum("bhwc,cd->bhwd", x, self.w) + self.bias[c][:, None, None, :] + tt * self.v
    )


class ProductEps:
  """eps(x, t, c) = tanh(x * scale[c]) * cos(t * freq): products only, no sums.

  Its rounding cannot depend on the batch size or on how XLA fuses it (no reductions, no
  additions that could be contracted with a product), so it isolates the samplers' own
  arithmetic in the on-policy ratio test.
  """

  def __init__(self, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.scale = rng.uniform(0.5, 1.5, size=(NUM_CLASSES + 1, channels))
    self.freq = rng.uniform(0.0, 3e-3, size=(channels,))

  def params(self):
    return {
        "scale": jnp.asarray(self.scale, jnp.float32),
        "freq": jnp.asarray(self.freq, jnp.float32),
    }

  @staticmethod
  def apply(params, x, t, c):
    tt = jnp.asarray(t, jnp.float32)[:, None, None, None]
    return jnp.tanh(x * params["scale"][c][:, None, None, :]) * jnp.cos(tt * params["freq"])


class TinyConvEps(nnx.Module):
  """A 2-layer conv net with class and time embeddings (only nnx.Param state)."""

  def __init__(self, channels: int, num_train_timesteps: int, *, rngs: nnx.Rngs, width=8):
    self.n = num_train_timesteps
    self.conv_in = nnx.Conv(channels, width, (3, 3), rngs=rngs)
    self.embed = nnx.Embed(NUM_CLASSES + 1, width, rngs=rngs)
    self.time = nnx.Linear(1, width, rngs=rngs)
    self.conv_out = nnx.Conv(width, channels, (3, 3), rngs=rngs)

  def __call__(self, x, t, c):
    tt = self.time((t.astype(jnp.float32) / self.n)[:, None])
    h = self.conv_in(x) + (self.embed(c) + tt)[:, None, None, :]
    return self.conv_out(jax.nn.silu(h))


@pytest.fixture
def linear_eps():
  return LinearEps(channels=2, num_train_timesteps=1000)


@pytest.fixture
def product_eps():
  return ProductEps(channels=2)


@pytest.fixture(scope="module")
def tiny_conv():
  """(graphdef, params) of a TinyConvEps over [B, 8, 8, 2]."""
  return nnx.split(TinyConvEps(2, 1000, rngs=nnx.Rngs(0)))
