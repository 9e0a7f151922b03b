"""DDIM/DDPM sampling with per-step Gaussian log-probabilities (Song, Meng & Ermon 2021).

One reverse step goes from timestep t to s = prev(t) (schedules eq. 6; abar_s from schedules
eq. 7, so abar_s = 1 on the last step by default). With the noise prediction eps:

  x0_hat  = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),  clipped to [-c, c] if clip_sample=c  (1)
  sigma_t = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)               (2)
  mu      = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma_t^2) eps                            (3)
  x_s     = mu + sigma_t z,        z ~ N(0, I)                                                (4)

(1)-(4) are eq. 12 of the DDIM paper with sigma_t(eta) of its eq. 16. eta = 0 is the
deterministic DDIM sampler; eta = 1 with consecutive timesteps (s = t - 1) is ancestral DDPM
sampling (sigma_t^2 is then the DDPM posterior variance). eta must lie in [0, 1]: above 1 the
square root in (3) can become imaginary.

Each step is a Gaussian policy N(x_s; mu, sigma_t^2 I). Over the D non-batch elements of x:

  l_d = -(x_{s,d} - mu_d)^2 / (2 sigma_t^2) - log sigma_t - log(2 pi) / 2                     (5)
  log_prob = (1/D) sum_d l_d   (the DDPO convention),    log_prob_sum = sum_d l_d             (6)

Where sigma_t = 0 (eta = 0, or the last step when abar_s = 1 makes (2) vanish) the step is
deterministic: its density is a point mass, and we define log_prob = log_prob_sum = 0 (with
zero, not NaN, gradients). Such a step carries no policy randomness, so it adds nothing to a
policy gradient and its importance ratio is 1. `step_log_prob` refuses eta = 0, where every
step would be 0; a schedule with set_alpha_to_one=False and steps_offset=1 (Stable
Diffusion's) makes the last step stochastic too.

Classifier-free guidance (Ho & Salimans 2022) with scale w and the null condition:

  eps = eps_theta(x, t, null) + w (eps_theta(x, t, c) - eps_theta(x, t, null))                (7)

The conditional and unconditional predictions come from ONE model call on a batch of 2B that
interleaves (x_b, c_b) and (x_b, null), so a batch-sharded x stays sharded without moving data.

On-policy ratio exp(lp_new - lp_old) = 1 exactly in float32. Four choices make the sampler
and `step_log_prob` compute bitwise the same log-prob for the same step and eps:
  * one code path: `sample` draws x_s with (4), then scores it with (5)-(6) from
    (x_s, mu, sigma_t) in `ddim_step`, which `step_log_prob` calls on a stored x_s;
  * timesteps and classes reach eps_fn and (1)-(5) as runtime [B] vectors in both (through
    `jax.lax.optimization_barrier`), so XLA neither constant-folds them (its compile-time
    exp/log round differently) nor specialises products on a scalar timestep;
  * the sums of (6) have a fixed order (`fixed_order_sum`), independent of the batch size;
  * arrays are multiplied by per-example reciprocals, never divided by a broadcast: XLA
    turns such a division into a reciprocal product in some compile contexts only.
What remains is eps_fn itself: the ratio is exactly 1 when the model gives an example the
same bits in a batch of B (sampling, inside the scan) and of B*T (training pairs, possibly
under jax.grad). Convolution and matmul kernels may not (XLA's CPU convolutions round some
outputs differently per batch size; GPU libraries pick algorithms per shape); the ratio is
then 1 up to float32 rounding of eps, amplified by 1/sigma_t (|ratio - 1| ~ 1e-6 - 1e-5).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from alignjax.diffusion.schedules import (
    NoiseSchedule,
    expand_like,
    alpha_cumprod_at,
    inference_prev_timesteps,
    inference_timesteps,
)

EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@flax.struct.dataclass
class DDIMStepOutput:
  """One reverse step (eqs. 1-6); `std` and the log-probs are [B], the rest like x_t."""

  prev_sample: jax.Array
  mean: jax.Array
  std: jax.Array
  log_prob: jax.Array
  log_prob_sum: jax.Array
  x0_pred: jax.Array


@flax.struct.dataclass
class Trajectory:
  """A batch of sampled chains: x_T first, x_0 last.

  latents [B, T+1, ...], timesteps/prev_timesteps/stds [T], log_probs/log_prob_sums [B, T]
  (step i goes from latents[:, i] at timesteps[i] to latents[:, i+1] at prev_timesteps[i]),
  cond: the conditioning pytree, every leaf [B, ...] (see `batch_size`).
  """

  latents: jax.Array
  timesteps: jax.Array
  prev_timesteps: jax.Array
  log_probs: jax.Array
  log_prob_sums: jax.Array
  stds: jax.Array
  cond: Any

  @property
  def final(self) -> jax.Array:
    return self.latents[:, -1]

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


@flax.struct.dataclass
class Transitions:
  """The (x_t, x_prev) pairs of a Trajectory, with their timesteps, cond and log-probs."""

  x_t: jax.Array
  x_prev: jax.Array
  t: jax.Array
  prev_t: jax.Array
  cond: Any
  log_prob: jax.Array


# ----------------------------------------------------------------------------- validation


def _concrete_float(name: str, value) -> float | None:
  """float(value), or None when value is traced (then it cannot be checked here)."""
  try:
    return float(value)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name}={value!r}: must be a real number") from e


def _check_eta(eta, *, allow_zero: bool = True):
  v = _concrete_float("eta", eta)
  if v is None:
    return eta
  if not 0.0 <= v <= 1.0:
    raise ValueError(f"eta={v}: must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
  if not allow_zero and v == 0.0:
    raise ValueError(
        "eta=0: deterministic DDIM steps have no log-probability (eq. 5 needs "
        "sigma_t > 0); sample with eta > 0 to score steps"
    )
  return v


def _check_clip(clip_sample) -> float | None:
  """None/False: no clipping; True: clip x0_hat to [-1, 1]; a float c > 0: to [-c, c]."""
  if clip_sample is None or clip_sample is False:
    return None
  if clip_sample is True:
    return 1.0
  v = _concrete_float("clip_sample", clip_sample)
  if v is None or not v > 0.0 or math.isinf(v):
    raise ValueError(
        f"clip_sample={clip_sample!r}: must be None (no clipping), True (= 1.0) "
        "or a finite Python float > 0"
    )
  return v


# ----------------------------------------------------------------------------- one step


def ddim_std(schedule: NoiseSchedule, t, prev_t, eta) -> jax.Array:
  """sigma_t of eq. 2, elementwise over integer timesteps t -> prev_t (any matching shape)."""
  abar_t = alpha_cumprod_at(schedule, t)
  abar_s = alpha_cumprod_at(schedule, prev_t)
  return eta * jnp.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))  # eq. 2


def fixed_order_sum(v: jax.Array) -> jax.Array:
  """Sum over all non-batch dims of v [B, ...] -> [B], by pairwise halving.

  Unlike jnp.sum, whose summation order XLA picks per shape and fusion (so the same row can
  round differently in a batch of B and of B*T), the order here is fixed by the row length
  alone: every level adds the second half of the row to the first (a zero pads odd lengths).
  """
  v = v.reshape(v.shape[0], -1)
  while v.shape[1] > 1:
    if v.shape[1] % 2:
      v = jnp.concatenate([v, jnp.zeros_like(v[:, :1])], axis=1)
    half = v.shape[1] // 2
    v = v[:, :half] + v[:, half:]
  return v[:, 0]


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean, sum) over non-batch dims of log N(x; mean, std^2) (eqs. 5-6); std is [B].

  Rows with std == 0 get 0 (see the module docstring), with finite gradients. The sum has a
  fixed order (`fixed_order_sum`), so a row's value does not depend on the batch around it.
  """
  std = expand_like(std, x)
  positive = std > 0
  safe_std = jnp.where(positive, std, 1.0)
  inv_two_var = 0.5 / jnp.square(safe_std)  # per example (see the module docstring)
  elementwise = -jnp.square(x - mean) * inv_two_var - jnp.log(safe_std) - _HALF_LOG_2PI  # eq. 5
  elementwise = jnp.where(positive, elementwise, 0.0)
  total = fixed_order_sum(elementwise)
  return total / (elementwise.size // elementwise.shape[0]), total  # eq. 6


def ddim_step(
    schedule: NoiseSchedule,
    eps: jax.Array,
    x_t: jax.Array,
    t,
    prev_t,
    eta,
    *,
    key: jax.Array | None = None,
    prev_sample: jax.Array | None = None,
    clip_sample=None,
) -> DDIMStepOutput:
  """One DDIM step t -> prev_t from the noise prediction eps (eqs. 1-6).

  Samples x_prev with `key` (eq. 4, z = jax.random.normal(key, x_t.shape, x_t.dtype)), or
  scores a given `prev_sample`; exactly one of the two. t and prev_t are scalars or [B] int
  timesteps (prev_t < 0 means past the end, schedules eq. 7). eta in [0, 1] is checked when
  it is concrete; under jit it may also be traced.
  """
  if (key is None) == (prev_sample is None):
    raise ValueError(
        "ddim_step: pass exactly one of key= (to sample x_prev) or "
        "prev_sample= (to score a given x_prev)"
    )
  if eps.shape != x_t.shape:
    raise ValueError(f"eps shape {eps.shape} must equal x_t shape {x_t.shape}")
  if prev_sample is not None and prev_sample.shape != x_t.shape:
    raise ValueError(f"prev_sample shape {prev_sample.shape} must equal x_t shape {x_t.shape}")
  eta = _check_eta(eta)
  clip = _check_clip(clip_sample)
  batch = (x_t.shape[0],)
  # Runtime [B] timesteps (see `sample`): no constant folding of the coefficients or log(std).
  t, prev_t = jax.lax.optimization_barrier(
      (
          jnp.broadcast_to(jnp.asarray(t, jnp.int32), batch),
          jnp.broadcast_to(jnp.asarray(prev_t, jnp.int32), batch),
      )
  )

  abar_t = expand_like(alpha_cumprod_at(schedule, t), x_t)
  abar_s = expand_like(alpha_cumprod_at(schedule, prev_t), x_t)
  # Per-example factors multiply, never divide, the arrays (see the module docstring).
  x0_pred = (x_t - jnp.sqrt(1.0 - abar_t) * eps) * (1.0 / jnp.sqrt(abar_t))  # eq. 1
  if clip is not None:
    x0_pred = jnp.clip(x0_pred, -clip, clip)
  std = ddim_std(schedule, t, prev_t, eta)  # eq. 2, [B]
  sigma = expand_like(std, x_t)
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_s - jnp.square(sigma), 0.0))
  mean = jnp.sqrt(abar_s) * x0_pred + direction * eps  # eq. 3
  if prev_sample is None:
    noise = jax.random.normal(key, x_t.shape, x_t.dtype)
    prev_sample = mean + sigma * noise  # eq. 4
  log_prob, log_prob_sum = gaussian_log_prob(prev_sample, mean, std)  # eqs. 5-6
  return DDIMStepOutput(
      prev_sample=prev_sample,
      mean=mean,
      std=std,
      log_prob=log_prob,
      log_prob_sum=log_prob_sum,
      x0_pred=x0_pred,
  )


# ----------------------------------------------------------------------------- conditions


def batch_size(cond: Any) -> int:
  """B of a conditioning pytree: every leaf is [B, ...] (class ids [B]; text embeddings
  [B, S, D] with their token ids [B, S]; ...), one condition per example."""
  leaves = jax.tree_util.tree_leaves(cond)
  if not leaves:
    raise ValueError("cond is empty: give one condition per example, every leaf [B, ...]")
  shapes = [jnp.shape(leaf) for leaf in leaves]
  if any(len(shape) < 1 for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
    raise ValueError(
        f"cond must be [B, ...] (one condition per example) in every leaf, got shapes {shapes}"
    )
  return int(shapes[0][0])


def null_like(null_cond: Any, cond: Any) -> Any:
  """The null condition broadcast to each example of `cond`: `null_cond` is one example's
  condition, a pytree of `cond`'s structure (or a single value for an array `cond`). A dict
  `null_cond` may name only the entries the model reads: the others keep `cond`'s values."""
  if isinstance(null_cond, dict) and isinstance(cond, dict):
    unknown = sorted(set(null_cond) - set(cond))
    if unknown:
      raise ValueError(f"null condition entries {unknown} are not in the condition {sorted(cond)}")
    return {k: null_like(null_cond[k], v) if k in null_cond else v for k, v in cond.items()}
  return jax.tree_util.tree_map(
      lambda null, c: jnp.broadcast_to(jnp.asarray(null, jnp.asarray(c).dtype), jnp.shape(c)),
      null_cond,
      cond,
  )


# ----------------------------------------------------------------------------- guidance


def classifier_free_guidance(eps_fn: EpsFn, guidance_scale, null_cond: Any = 10) -> EpsFn:
  """The guided EpsFn of eq. 7 (one model call on 2B examples).

  null_cond: the null condition of one example, broadcast to each example's condition
  (`null_like`): a class index for class-conditional models, the empty prompt's text
  embedding [S, D] for text-conditional ones (conditions [B, S, D]), or a pytree of the
  conditions' structure (leaves the model does not read may hold anything of their shape).

  guidance_scale 1 returns eps_fn itself (conditional only) and 0 the unconditional
  prediction, each with a single pass over B examples.
  """
  w = _concrete_float("guidance_scale", guidance_scale)
  if w is not None and not math.isfinite(w):
    raise ValueError(f"guidance_scale={guidance_scale}: must be finite")
  if w == 1.0:
    return eps_fn
  null = lambda cond: null_like(null_cond, cond)
  if w == 0.0:
    return lambda x, t, cond: eps_fn(x, t, null(cond))

  def guided(x, t, cond):
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
    pair = lambda a, c: jnp.stack([a, c], axis=1).reshape((2 * b,) + a.shape[1:])
    pairs = jax.tree_util.tree_map(pair, cond, null(cond))
    eps = eps_fn(pair(x, x), pair(t, t), pairs)
    eps = eps.reshape((b, 2) + x.shape[1:])
    eps_cond, eps_uncond = eps[:, 0], eps[:, 1]
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # eq. 7

  return guided


# ----------------------------------------------------------------------------- sampling


def sample(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    cond: Any,
    key: jax.Array,
    *,
    shape: tuple[int, ...],
    num_steps: int,
    eta,
    clip_sample=None,
    initial_latents: jax.Array | None = None,
    latent_sharding=None,
) -> Trajectory:
  """Runs num_steps DDIM steps (eqs. 1-6) from x_T ~ N(0, I) in one lax.scan.

  Args:
    eps_fn: the (possibly guided) EpsFn, eps_fn(x [B, *shape], t [B] int32, cond [B, ...]).
    cond: the conditioning pytree, every leaf [B, ...] (class labels [B], text embeddings
      [B, S, D], ...); its length is the batch size B (`batch_size`).
    key: PRNG key. x_T and the per-step noise use independent keys split from it.
    shape: the shape of ONE sample, e.g. (8, 8, 1); latents are [B, *shape]. Static.
    num_steps: T, 1 <= T <= num_train_timesteps ("leading" timesteps shifted by
      schedule.steps_offset, schedules eq. 6). Static.
    eta: in [0, 1]; 0 is deterministic given x_T.
    clip_sample: None, True (= 1.0) or c > 0: clip x0_hat to [-c, c] (eq. 1).
    initial_latents: optional x_T [B, *shape] instead of drawing it from `key`.
    latent_sharding: optional jax Sharding of [B, *shape] arrays, applied as a constraint to
      x_T and every step's sample (e.g. the batch sharding of the mesh).
  """
  eta = _check_eta(eta)
  clip = _check_clip(clip_sample)
  cond = jax.tree_util.tree_map(jnp.asarray, cond)
  batch = batch_size(cond)
  full_shape = (batch,) + tuple(int(d) for d in shape)
  n, offset = schedule.num_train_timesteps, schedule.steps_offset
  timesteps = jnp.asarray(inference_timesteps(n, num_steps, offset))
  prev_timesteps = jnp.asarray(inference_prev_timesteps(n, num_steps, offset))
  # Every step sees its timesteps as a runtime [B] vector, as step_log_prob does: the barrier
  # stops XLA from constant-folding the step coefficients, the time embedding or log(sigma_t)
  # (its compile-time exp/log differ from the runtime's in the last bit) and from rewriting
  # products with a broadcast scalar timestep, which rounds differently.
  per_example = lambda ts: jnp.broadcast_to(ts[:, None], (num_steps, batch))
  t_rows, prev_rows, cond = jax.lax.optimization_barrier(
      (per_example(timesteps), per_example(prev_timesteps), cond)
  )
  constrain = (
      (lambda x: x)
      if latent_sharding is None
      else (lambda x: jax.lax.with_sharding_constraint(x, latent_sharding))
  )

  noise_key, steps_key = jax.random.split(key)
  if initial_latents is None:
    x_init = jax.random.normal(noise_key, full_shape, jnp.float32)
  elif initial_latents.shape != full_shape:
    raise ValueError(
        f"initial_latents shape {initial_latents.shape} must be [B, *shape] = " f"{full_shape}"
    )
  else:
    x_init = initial_latents
  x_init = constrain(x_init)

  def step(x, inputs):
    t, prev_t, step_key = inputs  # [B], [B], key
    out = ddim_step(schedule, eps_fn(x, t, cond), x, t, prev_t, eta, key=step_key, clip_sample=clip)
    x_prev = constrain(out.prev_sample)
    return x_prev, (x_prev, out.log_prob, out.log_prob_sum)

  step_keys = jax.random.split(steps_key, num_steps)
  _, (xs, log_probs, log_prob_sums) = jax.lax.scan(step, x_init, (t_rows, prev_rows, step_keys))
  latents = jnp.concatenate([x_init[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
  return Trajectory(
      latents=latents,
      timesteps=timesteps,
      prev_timesteps=prev_timesteps,
      log_probs=log_probs.T,
      log_prob_sums=log_prob_sums.T,
      stds=ddim_std(schedule, t_rows[:, 0], prev_rows[:, 0], eta),
      cond=cond,
  )


def transitions(traj: Trajectory, *, flatten: bool = True) -> Transitions:
  """The trajectory's B*T steps as (x_t, x_prev, t, prev_t, cond, log_prob).

  Leading shape [B, T], or [B*T] (sample-major: row b*T + i is step i of sample b) if flatten.
  """
  batch, num_steps = traj.log_probs.shape
  per_step = lambda v: jnp.broadcast_to(v[None, :], (batch, num_steps))
  out = Transitions(
      x_t=traj.latents[:, :-1],
      x_prev=traj.latents[:, 1:],
      t=per_step(traj.timesteps),
      prev_t=per_step(traj.prev_timesteps),
      cond=jax.tree_util.tree_map(
          lambda c: jnp.broadcast_to(c[:, None], (batch, num_steps) + c.shape[1:]), traj.cond
      ),
      log_prob=traj.log_probs,
  )
  if flatten:
    out = jax.tree_util.tree_map(lambda v: v.reshape((batch * num_steps,) + v.shape[2:]), out)
  return out


def step_log_prob(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_t: jax.Array,
    x_prev: jax.Array,
    t,
    prev_t,
    cond: Any,
    eta,
    clip_sample=None,
) -> jax.Array:
  """Re-evaluates log pi(x_prev | x_t, cond) of stored steps (eqs. 1-3, 5-6), [B].

  t and prev_t are [B] (or scalars); the value equals the sampler's log_probs for the same
  step and parameters (see the module docstring). eta must be > 0.
  """
  eta = _check_eta(eta, allow_zero=False)
  batch = (x_t.shape[0],)
  # Runtime values, as in `sample`: nothing of eps_fn's time/class path is constant-folded.
  t, prev_t, cond = jax.lax.optimization_barrier(
      (
          jnp.broadcast_to(jnp.asarray(t, jnp.int32), batch),
          jnp.broadcast_to(jnp.asarray(prev_t, jnp.int32), batch),
          jax.tree_util.tree_map(jnp.asarray, cond),
      )
  )
  eps = eps_fn(x_t, t, cond)
  return ddim_step(
      schedule, eps, x_t, t, prev_t, eta, prev_sample=x_prev, clip_sample=clip_sample
  ).log_prob
