"""Flow matching (rectified flow) with Euler ODE and Euler–Maruyama SDE samplers.

Convention (that of Adjoint Matching, Domingo-Enrich, Drozdzal, Karrer & Chen 2024): time runs
FORWARD from noise to data, t ∈ [0, 1], X_0 ~ N(0, I) is noise and X_1 is data:

  (1)  X_t = β_t X_0 + α_t X_1,   α_t = t,  β_t = 1 − t   (α̇_t = 1, β̇_t = −1).

The velocity target is the time derivative of (1), and the loss regresses onto it:

  (2)  L(θ) = E_{t ~ U[0,1], X_0, X_1} ‖v_θ(X_t, t) − (X_1 − X_0)‖²
       (‖·‖² sums over the non-batch dimensions; the expectation is a batch mean).

The minimiser is v(x, t) = E[X_1 − X_0 | X_t = x] and the ODE dX = v(X, t) dt carries
N(0, I) at t = 0 to the data distribution at t = 1. For the affine path (1) the score of the
marginal p_t follows from v (E[X_0 | X_t] is linear in (x, v)):

  (3)  s(x, t) = ∇ log p_t(x) = (α_t v − α̇_t x) / (β_t (α̇_t β_t − α_t β̇_t)) = (t v − x) / (1 − t),

finite for t < 1. Every SDE with diffusion coefficient σ(t) ≥ 0 and drift

  (4)  b(x, t) = v(x, t) + (σ(t)² / 2) s(x, t)
             = v + σ²/(2 β_t (α̇_t β_t/α_t − β̇_t)) · (v − (α̇_t/α_t) x)
       dX = b(X, t) dt + σ(t) dB

has the same marginals p_t as the flow (σ = 0 is the ODE). With

  (5)  η_t = β_t (α̇_t β_t / α_t − β̇_t) = (1 − t) / t,   σ(t)² = 2 η_t  ⇒  b = 2 v − x / t,

the SDE is *memoryless*: X_0 and X_1 are independent, the property Adjoint Matching needs.
σ(t) of (5) diverges at t = 0, so we regularise it with a shift h > 0 (by default the step
size 1/K of the sampling grid):

  (6)  σ_h(t)² = 2 (1 − t + h) / (t + h),

which equals (5) up to O(h), is finite on [0, 1], and keeps the marginals exact (any σ does,
by (4)); the first Euler–Maruyama step then forgets X_0 up to O(h). Note that (4) is written
with the score form (3), which is finite at t = 0, so only σ needs regularising.

Sampling uses the uniform grid t_k = k / K, k = 0..K, h_k = t_{k+1} − t_k, and

  (7)  X_{k+1} = X_k + h_k b(X_k, t_k) + σ(t_k) √h_k ε_k,   ε_k ~ N(0, I)   (Euler–Maruyama),

the drift being evaluated at t_0..t_{K−1} < 1 only. σ ≡ 0 gives the Euler ODE step
X_{k+1} = X_k + h_k v(X_k, t_k). A velocity function is `vel_fn(x [B, ...], t [B]) -> v`
(like x); conditioning, if any, is closed over. σ functions map t (any shape) to σ(t).

Conditional velocity models are `vel(x [B, ...], t [B], cond) -> v` with cond a pytree whose
leaves are all [B, ...] (alignjax.diffusion.samplers); close over cond to get a VelFn. A
diffusion UNet net(x, τ, c) trained as a velocity model takes the diffusion timestep scale
run backwards, so that noise sits at the large timesteps as for an ε-model:

  (8)  τ(t) = time_scale · (1 − t),   v(x, t, c) = net(x, τ(t), c)   (a float τ),

and classifier-free guidance (Ho & Salimans 2022) combines velocities like samplers eq. 7,
with the null condition ∅:

  (9)  v_w(x, t, c) = v(x, t, ∅) + w (v(x, t, c) − v(x, t, ∅)).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from alignjax.diffusion import samplers
from alignjax.diffusion.schedules import expand_like

VelFn = Callable[[jax.Array, jax.Array], jax.Array]
CondVelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # vel(x, t, cond) -> v
SigmaFn = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class FlowTrajectory:
  """States X_0..X_K [B, K+1, ...] (noise first, sample last) on times t_0..t_K [K+1]."""

  states: jax.Array
  times: jax.Array

  @property
  def final(self) -> jax.Array:
    return self.states[:, -1]

  @property
  def num_steps(self) -> int:
    return self.times.shape[0] - 1


# ----------------------------------------------------------------------------- path and loss


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
  """X_t of eq. 1 for per-example times t [B]."""
  t = expand_like(t, x0)
  return (1.0 - t) * x0 + t * x1


def flow_matching_loss(vel_fn: VelFn, x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
  """Eq. 2 for given noise x0, data x1 [B, ...] and times t [B]: batch mean of ‖v − (x1−x0)‖²."""
  if x0.shape != x1.shape:
    raise ValueError(f"x0.shape={x0.shape} != x1.shape={x1.shape}: noise and data must match")
  if t.shape != x0.shape[:1]:
    raise ValueError(f"t.shape={t.shape}: must be [B] = {x0.shape[:1]}")
  err = vel_fn(interpolate(x0, x1, t), t) - (x1 - x0)  # eq. 2
  return jnp.mean(jnp.sum(jnp.square(err).reshape(err.shape[0], -1), axis=-1))


def sample_noise_and_time(x1: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x0 ~ N(0, I) like x1, t ~ U[0, 1) [B]) for a Monte-Carlo estimate of eq. 2."""
  k0, kt = jax.random.split(key)
  return (jax.random.normal(k0, x1.shape, x1.dtype), jax.random.uniform(kt, x1.shape[:1], x1.dtype))


# ----------------------------------------------------------------------------- velocity models


def unet_velocity(model_fn: Callable, time_scale: float) -> CondVelFn:
  """vel(x, t, cond) = model_fn(x, τ(t), cond) with τ = time_scale (1 − t) (eq. 8)."""
  return lambda x, t, cond: model_fn(x, time_scale * (1.0 - t), cond)  # eq. 8


def guided_velocity(vel_fn: CondVelFn, guidance_scale: float, null_cond: Any) -> CondVelFn:
  """v(x, t, ∅) + w (v(x, t, c) − v(x, t, ∅)) (eq. 9) as vel(x, t, cond); one call on 2B
  examples, the B conditional rows first (w = 1: vel_fn itself, the conditional velocity).

  null_cond: one example's null condition, broadcast to each example (`samplers.null_like`):
  a class index for class ids cond [B], or a pytree of cond's structure.
  """
  if guidance_scale == 1.0:
    return vel_fn

  def guided(x, t, cond):
    b = x.shape[0]
    both = lambda c, n: jnp.concatenate([c, n])
    v = vel_fn(
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jax.tree_util.tree_map(both, cond, samplers.null_like(null_cond, cond)),
    )
    return v[b:] + guidance_scale * (v[:b] - v[b:])  # eq. 9

  return guided


# ----------------------------------------------------------------------------- score, drift, σ


def score_from_velocity(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  """s(x, t) of eq. 3 from v = v(x, t); t [B] with t < 1."""
  t = expand_like(t, x)
  return (t * v - x) / (1.0 - t)


def drift_from_velocity(v: jax.Array, x: jax.Array, t: jax.Array, sigma: jax.Array) -> jax.Array:
  """b = v + (σ²/2) s of eq. 4; t [B] < 1 and sigma [B] (or scalar)."""
  sigma = expand_like(jnp.broadcast_to(sigma, t.shape), x)
  return v + 0.5 * jnp.square(sigma) * score_from_velocity(v, x, t)


def drift(vel_fn: VelFn, x: jax.Array, t: jax.Array, sigma: jax.Array) -> jax.Array:
  """b(x, t) of eq. 4 for a velocity function."""
  return drift_from_velocity(vel_fn(x, t), x, t, sigma)


def zero_sigma() -> SigmaFn:
  """σ ≡ 0: the SDE (7) is the Euler ODE."""
  return lambda t: jnp.zeros_like(jnp.asarray(t, jnp.float32))


def constant_sigma(value: float) -> SigmaFn:
  """σ ≡ value ≥ 0 (same marginals by eq. 4, but not memoryless unless value is eq. 5)."""
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
    raise ValueError(f"sigma={value!r}: must be a finite Python float >= 0")
  return lambda t: jnp.full_like(jnp.asarray(t, jnp.float32), value)


def memoryless_sigma(shift: float) -> SigmaFn:
  """σ_h(t) = sqrt(2 (1 − t + h) / (t + h)) of eq. 6 (eq. 5 when shift h = 0, for t > 0)."""
  if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift >= 0):
    raise ValueError(
        f"shift={shift!r}: must be a finite Python float >= 0 (0 is eq. 5, "
        "singular at t = 0; the samplers need shift > 0)"
    )
  return lambda t: jnp.sqrt(2.0 * (1.0 - t + shift) / (t + shift))


def time_grid(num_steps: int) -> jax.Array:
  """t_k = k / K, k = 0..K, float32 [K+1] (eq. 7)."""
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: must be a Python int >= 1")
  return jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps


# ----------------------------------------------------------------------------- samplers


def sample_sde(
    vel_fn: VelFn, x0: jax.Array, key: jax.Array | None, *, num_steps: int, sigma_fn: SigmaFn
) -> FlowTrajectory:
  """Euler–Maruyama (eq. 7) for the SDE of eq. 4, from X_0 = x0 [B, ...] over `time_grid`.

  One `lax.scan`; step k draws ε_k with `fold_in(key, k)`. key may be None only if σ ≡ 0 is
  meant (then use `sample_ode`); jit with num_steps static.
  """
  times = time_grid(num_steps)
  if key is None:
    raise ValueError("key=None: the SDE sampler needs a PRNG key (use sample_ode for σ = 0)")
  batch = x0.shape[0]

  def step(x, k):
    t, dt = times[k], times[k + 1] - times[k]
    tb = jnp.full((batch,), t, x.dtype)
    sigma = sigma_fn(tb)
    b = drift(vel_fn, x, tb, sigma)  # eq. 4
    eps = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
    x_next = x + dt * b + expand_like(sigma, x) * jnp.sqrt(dt) * eps  # eq. 7
    return x_next, x_next

  _, xs = jax.lax.scan(step, x0, jnp.arange(num_steps))
  states = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
  return FlowTrajectory(states=states, times=times)


def sample_ode(vel_fn: VelFn, x0: jax.Array, *, num_steps: int) -> FlowTrajectory:
  """Euler ODE X_{k+1} = X_k + h v(X_k, t_k) (eq. 7 with σ ≡ 0), over `time_grid`."""
  times = time_grid(num_steps)
  batch = x0.shape[0]

  def step(x, k):
    dt = times[k + 1] - times[k]
    x_next = x + dt * vel_fn(x, jnp.full((batch,), times[k], x.dtype))
    return x_next, x_next

  _, xs = jax.lax.scan(step, x0, jnp.arange(num_steps))
  states = jnp.concatenate([x0[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
  return FlowTrajectory(states=states, times=times)
