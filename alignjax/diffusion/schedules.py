"""Discrete-time noise schedules of denoising diffusion models (DDPM, Ho et al. 2020).

A schedule over N training timesteps t = 0, ..., N-1 is a sequence of betas:

    linear (DDPM):                 beta_t = b0 + (b1 - b0) * t / (N - 1)                      (1)
    scaled_linear (Stable Diff.):  beta_t = (sqrt(b0) + (sqrt(b1) - sqrt(b0)) * t / (N - 1))^2 (2)
    cosine (Nichol & Dhariwal 2021, diffusers' "squaredcos_cap_v2"):
        f(s) = cos^2((s + 0.008) / 1.008 * pi / 2),
        beta_t = min(1 - f((t + 1) / N) / f(t / N), 0.999)                                    (3)

with b0 = beta_start and b1 = beta_end, and

    alpha_t = 1 - beta_t,        abar_t = prod_{i <= t} alpha_i.                              (4)

The forward (noising) process samples x_t in one shot:

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,        eps ~ N(0, I).                     (5)

Inference uses S <= N timesteps with "leading" spacing (diffusers' DDIMScheduler default)
and an offset o (diffusers' `steps_offset`: 0 by default, 1 for Stable Diffusion):

    k = N // S,    tau_j = (S - 1 - j) k + o   for j = 0..S-1 (descending),
    prev(tau_j) = tau_j - k,                                                                  (6)

so the last step goes from tau = o to prev = o - k < 0.  At a negative (past-the-end)
timestep abar is `final_alpha_cumprod`: 1 by default (the chain ends at the clean sample,
diffusers' `set_alpha_to_one=True`), or abar_0 with `set_alpha_to_one=False` (Stable
Diffusion's setting):

    abar_prev = abar_{prev} if prev >= 0 else final_alpha_cumprod.                            (7)

With o = 0 and set_alpha_to_one=False the last step goes from abar_0 to abar_0: it returns
x_t unchanged, as diffusers does; use o = 1 with it, as Stable Diffusion does.

Betas and alpha products are computed in float64 on the host and stored as float32; they
agree with diffusers' DDPMScheduler/DDIMScheduler to ~5e-7.
"""

from __future__ import annotations

import math
import numbers

import flax.struct
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "scaled_linear", "cosine")
# diffusers' name of the cosine schedule, accepted so that scheduler configs map directly.
_ALIASES = {"squaredcos_cap_v2": "cosine"}
COSINE_MAX_BETA = 0.999


@flax.struct.dataclass
class NoiseSchedule:
  """Betas, alphas and their cumulative product (eq. 4), float32 [N]; a pytree.

  `final_alpha_cumprod` (float32 scalar) is abar at negative timesteps (eq. 7);
  `steps_offset` (a static int, not a leaf) shifts the inference timesteps (eq. 6).
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  final_alpha_cumprod: jnp.ndarray
  steps_offset: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name}={value!r}: must be an integer >= {minimum}")
  if value < minimum:
    raise ValueError(f"{name}={value}: must be an integer >= {minimum}")
  return int(value)


def _betas(kind: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Float64 betas of eqs. 1-3."""
  frac = np.arange(n, dtype=np.float64) / max(n - 1, 1)
  if kind == "linear":  # eq. 1
    return beta_start + (beta_end - beta_start) * frac
  if kind == "scaled_linear":  # eq. 2
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    return (lo + (hi - lo) * frac) ** 2
  # eq. 3, in Python floats (float64) as the definition is per step.
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1.0 - f((i + 1) / n) / f(i / n), COSINE_MAX_BETA) for i in range(n)])


def make_schedule(
    kind: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    set_alpha_to_one: bool = True,
    steps_offset: int = 0,
) -> NoiseSchedule:
  """Builds a NoiseSchedule.

  Args:
    kind: "linear" (eq. 1), "scaled_linear" (eq. 2) or "cosine" (eq. 3; "squaredcos_cap_v2"
      is accepted as diffusers' name for it). beta_start/beta_end are unused by "cosine".
    num_train_timesteps: N >= 1.
    beta_start, beta_end: 0 < beta_start <= beta_end < 1.
    set_alpha_to_one: final_alpha_cumprod = 1 if True, else abar_0 (eq. 7).
    steps_offset: o >= 0 of eq. 6, used by the samplers' inference timesteps.
  """
  if not isinstance(kind, str) or _ALIASES.get(kind, kind) not in KINDS:
    raise ValueError(
        f"unknown schedule kind {kind!r}: valid kinds are {', '.join(KINDS)} "
        "(or diffusers' 'squaredcos_cap_v2' for 'cosine')"
    )
  kind = _ALIASES.get(kind, kind)
  n = _check_int("num_train_timesteps", num_train_timesteps, 1)
  steps_offset = _check_int("steps_offset", steps_offset, 0)
  if steps_offset >= n:
    raise ValueError(f"steps_offset={steps_offset}: must be < num_train_timesteps={n}")
  if kind != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
        f"beta_start={beta_start}, beta_end={beta_end}: need " "0 < beta_start <= beta_end < 1"
    )
  betas = _betas(kind, n, float(beta_start), float(beta_end))
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)  # eq. 4
  final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
  return NoiseSchedule(
      betas=jnp.asarray(betas, jnp.float32),
      alphas=jnp.asarray(alphas, jnp.float32),
      alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
      final_alpha_cumprod=jnp.asarray(final, jnp.float32),
      steps_offset=steps_offset,
  )


def alpha_cumprod_at(schedule: NoiseSchedule, t) -> jnp.ndarray:
  """abar at integer timesteps t (any shape); final_alpha_cumprod where t < 0 (eq. 7)."""
  t = jnp.asarray(t, jnp.int32)
  n = schedule.num_train_timesteps
  inside = schedule.alphas_cumprod[jnp.clip(t, 0, n - 1)]
  return jnp.where(t >= 0, inside, schedule.final_alpha_cumprod)


def expand_like(v: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a per-example [B] (or scalar) value to broadcast against x [B, ...]."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 5); t is a scalar or [B] int."""
  if x0.shape != noise.shape:
    raise ValueError(f"x0 shape {x0.shape} and noise shape {noise.shape} must be equal")
  abar = expand_like(schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)], x0)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def _check_steps(num_train_timesteps, num_steps, steps_offset) -> tuple[int, int, int]:
  n = _check_int("num_train_timesteps", num_train_timesteps, 1)
  s = _check_int("num_steps", num_steps, 1)
  o = _check_int("steps_offset", steps_offset, 0)
  if s > n:
    raise ValueError(f"num_steps={s}: must be between 1 and num_train_timesteps={n}")
  if (s - 1) * (n // s) + o > n - 1:
    raise ValueError(
        f"steps_offset={o}: the first of num_steps={s} timesteps would be "
        f"{(s - 1) * (n // s) + o} > num_train_timesteps - 1 = {n - 1}"
    )
  return n, s, o


def inference_timesteps(
    num_train_timesteps: int, num_steps: int, steps_offset: int = 0
) -> np.ndarray:
  """Descending "leading" timesteps (eq. 6), np.int32 [num_steps]: 1000, 50 -> 980, ..., 0."""
  n, s, o = _check_steps(num_train_timesteps, num_steps, steps_offset)
  return (np.arange(s - 1, -1, -1) * (n // s) + o).astype(np.int32)


def inference_prev_timesteps(
    num_train_timesteps: int, num_steps: int, steps_offset: int = 0
) -> np.ndarray:
  """The timestep each inference step goes to (eq. 6), np.int32 [num_steps]; last is < 0."""
  n, s, o = _check_steps(num_train_timesteps, num_steps, steps_offset)
  return inference_timesteps(n, s, o) - np.int32(n // s)
