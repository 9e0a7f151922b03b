"""Adjoint Matching for flow models (Domingo-Enrich, Drozdzal, Karrer & Chen 2024,
"Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with Memoryless
Stochastic Optimal Control").

Flow convention and equation numbers "flow eq. n" are those of alignjax.diffusion.flow
(t: noise 0 → data 1, X_t = (1 − t) X_0 + t X_1). For a diffusion coefficient σ(t) > 0 the
base model v_base and the fine-tuned model v_θ define SDEs dX = b(X, t) dt + σ dB with drifts
b_base, b_θ of flow eq. 4. Fine-tuning is the control problem

  (1)  dX = (b_base(X, t) + σ(t) u(X, t)) dt + σ(t) dB,
       min_u E[ ∫_0^1 ½ ‖u(X_t, t)‖² dt − λ r(X_1) ],

whose optimum, when the base SDE is memoryless (flow eq. 5/6), has terminal law
p*(x) ∝ p_base(x) exp(λ r(x)). The control of the fine-tuned model is

  (2)  u_θ = (b_θ − b_base) / σ = κ(t) (v_θ − v_base) / σ,   κ(t) = 1 + σ(t)² t / (2 (1 − t)),

since b is affine in v (flow eqs. 3-4). For the memoryless σ² = 2(1 − t)/t, κ = 2 and
u_θ = 2 (v_θ − v_base)/σ. The lean adjoint along a trajectory X of the fine-tuned model is

  (3)  dã/dt = −ã ∇_x b_base(X_t, t),   ã(1) = −λ ∇r(X_1),

and Adjoint Matching regresses the control onto u* = −σ ã:

  (4)  L(θ) = E[ ∫_0^1 ‖u_θ(X_t, t) + σ(t) ã(t)‖² dt ],   X, ã stop-gradient,
            = E[ ∫_0^1 ‖(2/σ)(v_θ − v_base) + σ ã‖² dt ]   (memoryless case).

Discretisation on the sampler's grid t_k = k/K (flow eq. 7) with h_k = t_{k+1} − t_k: (3) is
the exact vector–Jacobian recursion of the Euler–Maruyama map X_{k+1} = X_k + h_k b(X_k, t_k)
+ σ_k √h_k ε_k,

  (5)  ã_K = −λ ∇r(X_K),   ã_k = ã_{k+1} + h_k ã_{k+1} ∇_x b_base(X_k, t_k)   (jax.vjp),

and (4) becomes a sum over the K steps with weights h_k. Step k's control acts on the
transition X_k → X_{k+1}, so its target uses the adjoint at the END of the step, ã_{k+1}:
tilting the Gaussian Euler–Maruyama kernel N(X_k + h_k b_base, σ_k² h_k I) by exp(V_{k+1})
with ∇V_{k+1} = −ã_{k+1} shifts its mean by −σ_k² h_k ã_{k+1} = h_k σ_k u*_k. This is exact
for the discrete chain when V is linear (linear-Gaussian base, linear reward) and equals (4)
up to O(h); the left-point ã_k instead is badly off on the first step, where the memoryless
σ_k² h_k ≈ 2 and 1 + h_k ∇b ≈ 0. Timestep subsampling draws, for every trajectory
independently, M of the K steps without replacement; the Monte-Carlo estimate of (4) is

  (6)  L ≈ (1/B) Σ_b (K/M) Σ_{k ∈ S_b} h_k min(‖u_θ(X_k, t_k) + σ_k ã_{k+1}‖², C),

with C the per-(sample, time) loss clip (∞ disables it; clipped terms give no gradient).
Any σ > 0 may be used (e.g. a constant) to study the bias of non-memoryless fine-tuning:
then p* carries the initial value-function bias of the paper and is NOT the tilted law.

Conditional models (`make_conditional_update_fn`) take the conditioning as a pytree whose
leaves are all [B, ...] (class ids [B], or text embeddings with their token ids), as in
alignjax.diffusion.samplers; the loss's B·M rows repeat every leaf sample-major. The
builders are called once for the sampled trajectory and once for the loss, outside every
scan, so a LoRA merge they perform runs twice per update, not once per step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax.diffusion import flow, samplers
from alignjax.diffusion.schedules import expand_like
from alignjax.training import TrainState

RewardFn = Callable[[jax.Array], jax.Array]  # r(x [B, ...]) -> [B], differentiable


def sample_memoryless(
    vel_fn: flow.VelFn,
    x0: jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    sigma_fn: flow.SigmaFn | None = None,
) -> flow.FlowTrajectory:
  """Stop-gradient trajectory of the fine-tuned SDE (flow eq. 7).

  sigma_fn defaults to the memoryless σ_h of flow eq. 6 with shift h = 1/num_steps.
  """
  if sigma_fn is None:
    sigma_fn = flow.memoryless_sigma(1.0 / num_steps)
  traj = flow.sample_sde(vel_fn, x0, key, num_steps=num_steps, sigma_fn=sigma_fn)
  return jax.lax.stop_gradient(traj)


def terminal_adjoint(reward_fn: RewardFn, x1: jax.Array, lam) -> jax.Array:
  """ã(1) = −λ ∇r(X_1) of eq. 3 (r is applied per example, so ∇ of Σ_b r is per example)."""
  return -lam * jax.grad(lambda x: jnp.sum(reward_fn(x)))(x1)


def lean_adjoint(
    base_vel_fn: flow.VelFn, traj: flow.FlowTrajectory, terminal: jax.Array, sigma_fn: flow.SigmaFn
) -> jax.Array:
  """ã_0..ã_K [B, K+1, ...] of eq. 5 (backward `lax.scan` of VJPs of the BASE drift)."""
  times = traj.times
  batch = traj.states.shape[0]
  if terminal.shape != traj.final.shape:
    raise ValueError(f"terminal.shape={terminal.shape}: must equal X_1's {traj.final.shape}")

  def step(a_next, k):
    x, t = traj.states[:, k], jnp.full((batch,), times[k], terminal.dtype)
    dt = times[k + 1] - times[k]
    b_fn = lambda y: flow.drift(base_vel_fn, y, t, sigma_fn(t))  # flow eq. 4
    _, vjp = jax.vjp(b_fn, x)
    a = a_next + dt * vjp(a_next)[0]  # eq. 5
    return a, a

  _, adj = jax.lax.scan(step, terminal, jnp.arange(traj.num_steps), reverse=True)
  adj = jnp.concatenate([jnp.moveaxis(adj, 0, 1), terminal[:, None]], axis=1)
  return jax.lax.stop_gradient(adj)


def control(
    v: jax.Array, v_base: jax.Array, x: jax.Array, t: jax.Array, sigma: jax.Array
) -> jax.Array:
  """u = (b_θ − b_base)/σ = κ(t)(v − v_base)/σ of eq. 2; t, sigma [B] with t < 1, σ > 0."""
  t, sigma = expand_like(t, x), expand_like(sigma, x)
  kappa = 1.0 + jnp.square(sigma) * t / (2.0 * (1.0 - t))  # eq. 2
  return kappa * (v - v_base) / sigma


def subsample_timesteps(key: jax.Array, batch: int, num_steps: int, num_timesteps: int):
  """[B, M] int32 grid indices: M of 0..K−1 without replacement, independently per row."""
  if not 1 <= num_timesteps <= num_steps:
    raise ValueError(f"num_timesteps={num_timesteps}: must lie in [1, num_steps={num_steps}]")
  scores = jax.random.uniform(key, (batch, num_steps))
  return jnp.argsort(scores, axis=-1)[:, :num_timesteps].astype(jnp.int32)


def loss_timesteps(
    key: jax.Array | None, batch: int, num_steps: int, num_timesteps: int | None
) -> jax.Array:
  """[B, M] grid indices of the loss (eq. 6): all K steps when num_timesteps is None or K,
  else `subsample_timesteps` (which needs the key)."""
  m = num_steps if num_timesteps is None else num_timesteps
  if not 1 <= m <= num_steps:
    raise ValueError(f"num_timesteps={m}: must lie in [1, num_steps={num_steps}]")
  if m == num_steps:
    return jnp.broadcast_to(jnp.arange(num_steps, dtype=jnp.int32), (batch, num_steps))
  if key is None:
    raise ValueError("key=None: timestep subsampling (num_timesteps < K) needs a PRNG key")
  return subsample_timesteps(key, batch, num_steps, m)


def adjoint_matching_loss(
    vel_fn: flow.VelFn,
    base_vel_fn: flow.VelFn,
    traj: flow.FlowTrajectory,
    adjoint: jax.Array,
    sigma_fn: flow.SigmaFn,
    key: jax.Array | None = None,
    *,
    num_timesteps: int | None = None,
    loss_clip: float = math.inf,
):
  """Eq. 6: returns (loss, aux) with aux {"clip_fraction", "residual"} diagnostics.

  key is needed only when subsampling (num_timesteps < K; None uses all K points).
  """
  if not loss_clip > 0:
    raise ValueError(f"loss_clip={loss_clip!r}: must be > 0 (math.inf disables clipping)")
  batch, num_steps = traj.states.shape[0], traj.num_steps
  idx = loss_timesteps(key, batch, num_steps, num_timesteps)
  m = idx.shape[1]
  take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
  x = take(traj.states).reshape((batch * m,) + traj.states.shape[2:])
  a = take(adjoint[:, 1:]).reshape(x.shape)  # ã_{k+1}, eq. 6
  t = traj.times[idx].reshape(-1)
  h = (traj.times[idx + 1] - traj.times[idx]).reshape(-1)
  sigma = sigma_fn(t)
  u = control(vel_fn(x, t), base_vel_fn(x, t), x, t, sigma)  # eq. 2
  res = u + expand_like(sigma, a) * a  # eq. 4
  sq = jnp.sum(jnp.square(res).reshape(res.shape[0], -1), axis=-1)
  per = h * jnp.minimum(sq, loss_clip)  # eq. 6
  loss = jnp.sum(per) * (num_steps / m) / batch
  return loss, {"clip_fraction": jnp.mean(sq > loss_clip), "residual": jnp.mean(sq)}


def make_update_fn(
    vel_fn_builder: Callable,
    base_vel_fn_builder: Callable,
    reward_fn_builder: Callable,
    optimizer: optax.GradientTransformation,
    *,
    lam: float,
    num_steps: int,
    batch_size: int,
    shape: tuple[int, ...],
    sigma_fn: flow.SigmaFn | None = None,
    num_timesteps: int | None = None,
    loss_clip: float = math.inf,
):
  """Builds `update(state, frozen, key) -> (state, metrics)`, one Adjoint Matching step.

  `vel_fn_builder(trainable, frozen)` gives v_θ, `base_vel_fn_builder(frozen)` the frozen
  v_base and `reward_fn_builder(frozen)` the differentiable reward r(x [B, ...]) -> [B] (reward
  model weights are frozen arguments, not constants baked into the compiled step). One step
  samples `batch_size` trajectories of shape [B, *shape] from v_θ (stop-gradient), solves
  eq. 5, and takes one optimizer step on eq. 6. sigma_fn defaults to the memoryless σ_h
  (flow eq. 6, h = 1/num_steps). Pure: jit it, donating the state.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be >= 1")
  update = make_conditional_update_fn(
      lambda params, frozen, cond: vel_fn_builder(params, frozen),
      lambda frozen, cond: base_vel_fn_builder(frozen),
      lambda frozen, cond: reward_fn_builder(frozen),
      optimizer,
      lam=lam,
      num_steps=num_steps,
      shape=shape,
      sigma_fn=sigma_fn,
      num_timesteps=num_timesteps,
      loss_clip=loss_clip,
  )
  return lambda state, frozen, key: update(state, frozen, key, jnp.zeros((batch_size,), jnp.int32))


def make_conditional_update_fn(
    vel_fn_builder: Callable,
    base_vel_fn_builder: Callable,
    reward_fn_builder: Callable,
    optimizer: optax.GradientTransformation,
    *,
    lam: float,
    num_steps: int,
    shape: tuple[int, ...],
    sigma_fn: flow.SigmaFn | None = None,
    num_timesteps: int | None = None,
    loss_clip: float = math.inf,
):
  """`make_update_fn` for conditional models: `update(state, frozen, key, cond)`.

  The builders also receive the conditioning of the rows they are applied to (e.g. class
  ids), since a VelFn v(x, t) closes over it: `vel_fn_builder(trainable, frozen, cond)`,
  `base_vel_fn_builder(frozen, cond)`, `reward_fn_builder(frozen, cond)`. One step samples
  B trajectories (cond: a pytree of [B, ...] leaves, `samplers.batch_size`); the loss (eq. 6)
  evaluates the velocities on the B·M subsampled (sample, time) rows, sample-major, so its
  builders get every leaf repeated, `jnp.repeat(leaf, M, axis=0)`.
  """
  if sigma_fn is None:
    sigma_fn = flow.memoryless_sigma(1.0 / num_steps)
  grid_sigma = np.asarray(sigma_fn(flow.time_grid(num_steps)[:-1]))
  if not np.all(np.isfinite(grid_sigma)) or not np.all(grid_sigma > 0):
    raise ValueError(
        "sigma_fn must be finite and > 0 on the grid: the control (eq. 2) "
        "divides by σ; σ = 0 (the ODE) has no Adjoint Matching loss"
    )

  def update(state: TrainState, frozen, key: jax.Array, cond: Any):
    k_x0, k_sde, k_sub = jax.random.split(key, 3)
    base_vel, reward_fn = base_vel_fn_builder(frozen, cond), reward_fn_builder(frozen, cond)
    x0 = jax.random.normal(k_x0, (samplers.batch_size(cond),) + tuple(shape), jnp.float32)
    traj = sample_memoryless(
        vel_fn_builder(state.params, frozen, cond),
        x0,
        k_sde,
        num_steps=num_steps,
        sigma_fn=sigma_fn,
    )
    adj = lean_adjoint(base_vel, traj, terminal_adjoint(reward_fn, traj.final, lam), sigma_fn)

    m = num_steps if num_timesteps is None else num_timesteps
    rows = jax.tree_util.tree_map(lambda c: jnp.repeat(c, m, axis=0), cond)

    def loss_fn(params):
      return adjoint_matching_loss(
          vel_fn_builder(params, frozen, rows),
          base_vel_fn_builder(frozen, rows),
          traj,
          adj,
          sigma_fn,
          k_sub,
          num_timesteps=num_timesteps,
          loss_clip=loss_clip,
      )

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {
        "loss": loss,
        "reward": jnp.mean(reward_fn(traj.final)),
        "grad_norm": optax.tree.norm(grads),
        **aux,
    }
    return state.apply_gradients(grads, optimizer), metrics

  return update
