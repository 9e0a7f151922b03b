"""Toy flow models on R^D: closed-form Gaussian / Gaussian-mixture velocities and a small MLP.

Flow convention of alignjax.diffusion.flow: X_t = (1 − t) X_0 + t X_1, X_0 ~ N(0, I).

Gaussian data X_1 ~ N(μ, s² I). X_t is Gaussian with

  (1)  m_t = t μ,   v_t = (1 − t)² + t² s²   (per-coordinate variance),

and (X_1 − X_0, X_t) are jointly Gaussian with Cov(X_1 − X_0, X_t) = t s² − (1 − t) per
coordinate, so the flow-matching velocity v(x, t) = E[X_1 − X_0 | X_t = x] is

  (2)  v(x, t) = μ + ((t s² − (1 − t)) / v_t) (x − t μ).

Mixture data X_1 ~ Σ_k w_k N(μ_k, s_k² I): given the component, (2) holds with (μ_k, s_k);
the component posterior at time t is π_k(x, t) ∝ w_k N(x; t μ_k, v_{k,t} I), hence

  (3)  v(x, t) = Σ_k π_k(x, t) v_k(x, t).

Reward tilting by a linear reward r(x) = c·x with multiplier λ: p(x) exp(λ c·x) maps

  (4)  N(μ, s² I)  →  N(μ + λ s² c, s² I),
  (5)  Σ_k w_k N(μ_k, s_k² I)  →  Σ_k w'_k N(μ_k + λ s_k² c, s_k² I),
       w'_k ∝ w_k exp(λ c·μ_k + λ² s_k² ‖c‖² / 2)

(complete the square in each Gaussian; the normaliser of component k gives w'_k).

`VelocityMLP` is a small residual network: v_θ(x, t) = v_base(x, t) + MLP([x, t]) whose last
layer starts at zero, so fine-tuning starts exactly at the base model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _as_f32(a) -> jax.Array:
  return jnp.asarray(a, jnp.float32)


def gaussian_marginal(mean, std, t):
  """(m_t [B, D], v_t [B, 1]) of eq. 1 for times t [B]."""
  t = _as_f32(t)[:, None]
  return t * _as_f32(mean), (1.0 - t) ** 2 + (t * std) ** 2


def gaussian_velocity(mean, std: float):
  """vel_fn(x [B, D], t [B]) of eq. 2 for data N(mean, std² I)."""
  if not std > 0:
    raise ValueError(f"std={std!r}: must be > 0")
  mean = _as_f32(mean)

  def vel_fn(x, t):
    tt = _as_f32(t)[:, None]
    m, var = gaussian_marginal(mean, std, t)
    return mean + (tt * std**2 - (1.0 - tt)) / var * (x - m)  # eq. 2

  return vel_fn


def _check_mixture(weights, means, stds):
  weights, means, stds = (np.asarray(a, np.float64) for a in (weights, means, stds))
  if weights.ndim != 1 or means.shape[:1] != weights.shape or stds.shape != weights.shape:
    raise ValueError(
        f"mixture shapes weights={weights.shape}, means={means.shape}, "
        f"stds={stds.shape}: need [K], [K, D], [K]"
    )
  if np.any(weights <= 0) or np.any(stds <= 0):
    raise ValueError("mixture weights and stds must all be > 0")
  return weights / weights.sum(), means, stds


def mixture_log_density(weights, means, stds, x, t):
  """(log p_t(x) [B], log π_k(x, t) [B, K]) of the mixture's marginal at time t (eqs. 1, 3)."""
  weights, means, stds = (_as_f32(a) for a in _check_mixture(weights, means, stds))
  t = _as_f32(t)[:, None]  # [B, 1]
  var = (1.0 - t) ** 2 + (t * stds[None]) ** 2  # [B, K]
  diff = x[:, None, :] - t[:, :, None] * means[None]  # [B, K, D]
  d = x.shape[-1]
  logn = -0.5 * jnp.sum(diff**2, -1) / var - 0.5 * d * jnp.log(2 * jnp.pi * var)
  joint = jnp.log(weights)[None] + logn
  logp = jax.nn.logsumexp(joint, axis=-1)
  return logp, joint - logp[:, None]


def mixture_velocity(weights, means, stds):
  """vel_fn(x [B, D], t [B]) of eq. 3 for data Σ_k w_k N(μ_k, s_k² I)."""
  w, mu, s = _check_mixture(weights, means, stds)
  comps = [gaussian_velocity(mu[k], float(s[k])) for k in range(len(w))]

  def vel_fn(x, t):
    _, log_post = mixture_log_density(w, mu, s, x, t)
    vs = jnp.stack([f(x, t) for f in comps], axis=1)  # [B, K, D]
    return jnp.sum(jnp.exp(log_post)[..., None] * vs, axis=1)  # eq. 3

  return vel_fn


def tilted_gaussian(mean, std: float, c, lam: float):
  """Mean of the tilted Gaussian of eq. 4 (the std is unchanged)."""
  return np.asarray(mean, np.float64) + lam * std**2 * np.asarray(c, np.float64)


def tilted_mixture(weights, means, stds, c, lam: float):
  """(weights', means') of eq. 5 (stds unchanged)."""
  w, mu, s = _check_mixture(weights, means, stds)
  c = np.asarray(c, np.float64)
  logw = np.log(w) + lam * mu @ c + 0.5 * lam**2 * s**2 * (c @ c)
  w_new = np.exp(logw - logw.max())
  return w_new / w_new.sum(), mu + lam * s[:, None] ** 2 * c[None]


class VelocityMLP(nnx.Module):
  """Residual MLP on [x, t] (x [B, D]); `__call__(x, t)` is zero at init (see docstring)."""

  def __init__(self, dim: int, *, hidden: int = 64, depth: int = 2, rngs: nnx.Rngs):
    if depth < 1 or hidden < 1 or dim < 1:
      raise ValueError(f"dim={dim}, hidden={hidden}, depth={depth}: all must be >= 1")
    sizes = [dim + 3] + [hidden] * depth
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(hidden, dim, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x, t):
    t = jnp.asarray(t, x.dtype)[:, None]
    h = jnp.concatenate([x, t, jnp.sin(jnp.pi * t), jnp.cos(jnp.pi * t)], axis=-1)
    for layer in self.layers:
      h = jax.nn.silu(layer(h))
    return self.out(h)


def residual_velocity(graphdef, params, base_vel_fn):
  """vel_fn(x, t) = base_vel_fn(x, t) + VelocityMLP(params)(x, t) (initially the base)."""
  mlp = nnx.merge(graphdef, params)
  return lambda x, t: base_vel_fn(x, t) + mlp(x, t)
