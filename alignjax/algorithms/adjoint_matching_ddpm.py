"""Adjoint Matching for DDPM/DDIM (epsilon-prediction) models: the discrete-time version.

The flow version (alignjax.algorithms.adjoint_matching) discretises an SDE; a DDPM model is a
discrete Gaussian Markov chain to begin with, so here the control problem is posed on the
chain itself. Notation of alignjax.diffusion.samplers ("samplers eq. n"): K inference steps
τ_0 > τ_1 > ... > τ_{K−1} (prev(τ_{K−1}) < 0, ᾱ = 1 there), and states X_0 = x_T ~ N(0, I)
(noise, first) ... X_K = x_0 (the sample, last), as in `samplers.Trajectory.latents`. Step k
goes from X_k at τ_k to X_{k+1}:

  (1)  X_{k+1} = μ(X_k, k) + σ_k ε_k,   ε_k ~ N(0, I),

with μ the DDIM mean (samplers eqs. 1, 3: x̂_0 from ε, optionally clipped) and σ_k the
DDIM std (samplers eq. 2). For eta = 1 the step is the DDPM posterior q(x_s | x_t, x̂_0)
and the chain is *memoryless*: for the ideal ε the joint law of (X_0, X_K) is that of the
forward process, under which x_T and x_0 are independent up to √ᾱ_{τ_0} (≈ 0.008 for the
linear 1000-step schedule and τ_0 = 980). eta < 1 is allowed (σ_k > 0 is what the loss
needs), but its optimum carries the initial value-function bias, as a constant σ does in
the flow version.

The fine-tuned model ε_θ and the frozen base ε_base give means μ_θ, μ_base with the same σ_k.
The per-step KL is ‖μ_θ − μ_base‖² / (2σ_k²), so with the control

  (2)  u_k(x) = (μ_θ(x, k) − μ_base(x, k)) / σ_k             (steps with σ_k > 0)

fine-tuning is the discrete control problem

  (3)  min_θ E[ Σ_k ½ ‖u_k(X_k)‖² − λ r(X_K) ] = KL(P_θ ‖ P_base) − λ E_θ[r(X_K)],

whose optimal path law is P* ∝ P_base exp(λ r(X_K)); memorylessness makes its terminal law
p_base(x) exp(λ r(x)) / Z. With the value function V_k(x) = log E_base[exp(λ r(X_K)) | X_k = x],
the optimal kernel tilts N(μ_base, σ_k² I) by exp(V_{k+1}); when V_{k+1} is linear (a
linear-Gaussian base and a linear reward) this is exactly a mean shift σ_k² ∇V_{k+1}, so

  (4)  u*_k = σ_k ∇V_{k+1}(X_{k+1}) = −σ_k ã_{k+1},

in general up to O(σ_k²) terms. The lean adjoint is the vector–Jacobian recursion of the
base mean map (the Jacobian of the noise-free step (1)) along a trajectory of the fine-tuned
chain:

  (5)  ã_K = −λ ∇r(X_K),    ã_k = ã_{k+1} ∂μ_base(X_k, k)/∂X_k     (jax.vjp),

and Adjoint Matching regresses the control (2) onto (4):

  (6)  L(θ) = E[ Σ_{k: σ_k > 0} ‖u_k(X_k) + σ_k ã_{k+1}‖² ],   X, ã stop-gradient.

Without clipping μ is affine in ε (samplers eqs. 1, 3), μ = A_k x + c_k ε with
c_k = √(1 − ᾱ_s − σ_k²) − √ᾱ_s √(1 − ᾱ_t) / √ᾱ_t, so (2) reads

  (7)  u_k = c_k (ε_θ − ε_base) / σ_k;

the code evaluates (2) from the means, so clipped x̂_0 is handled as part of μ. Steps with
σ_k = 0 (the last step onto ᾱ = 1 is deterministic, x_0 = x̂_0) carry no control: they are
left out of (6), and their mean is the fine-tuned model's, as sampled. Timestep subsampling
draws, per trajectory, M of the K steps without replacement; the estimate of (6) is

  (8)  L ≈ (1/B) Σ_b (K/M) Σ_{k ∈ S_b} 1[σ_k > 0] min(‖u_k + σ_k ã_{k+1}‖², C),

with C the per-(sample, step) clip (∞ disables it; clipped terms give no gradient). With
σ_k ≈ σ(t)√h, (6) is the flow module's eq. 6 on the DDPM chain: ‖u_k + σ_k ã‖² = h ‖u + σ ã‖²
for the continuous control u.

Gradient accumulation. Write (8) as L = s Σ_p ℓ_p over the P = B·M selected pairs p, flattened
sample-major (p = b·M + i), with ℓ_p the clipped, masked term and s = (K/M)/B. For n chunks
P_j = {p : p ≡ j (mod n)} of P/n pairs each (n must divide P),

  (9)  L = Σ_{j<n} s Σ_{p ∈ P_j} ℓ_p,    ∇_θ L = Σ_{j<n} ∇_θ (s Σ_{p ∈ P_j} ℓ_p),

exactly, with the same global s in every chunk: the update differentiates one chunk at a time
in a `lax.scan` and sums the gradients, so only P/n pairs go through the model's backward
pass at once. The aux metrics are ratios of sums over all pairs, accumulated alike. The
chunks are strided rather than contiguous so that, when n divides M, every chunk holds M/n
steps of every sample and stays spread over the data-parallel devices.

The conditioning c is a pytree whose leaves are all [B, ...] (class ids [B], or text
embeddings with their token ids), as in alignjax.diffusion.samplers; the ε functions and the
reward receive it whole (guidance, with a null condition of c's structure, lives inside the
EpsFns: `samplers.classifier_free_guidance`). LoRA-style parameter transforms need no special
option here: `eps_fn_builder(params, frozen)` is called once for the sampled chain and once
for the loss, outside every scan, so a merge it performs runs twice per update, not per step
(with n > 1 chunks of eq. 9 the loss's call sits in the chunk scan: once per chunk).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax.algorithms.adjoint_matching import loss_timesteps, subsample_timesteps  # noqa: F401
from alignjax.diffusion import samplers
from alignjax.diffusion.schedules import (
    NoiseSchedule,
    expand_like,
    inference_prev_timesteps,
    inference_timesteps,
)
from alignjax.training import TrainState

EpsFn = samplers.EpsFn
CondRewardFn = Callable[[jax.Array, Any], jax.Array]  # r(x [B, ...], cond) -> [B]


def _check_eta(eta) -> float:
  eta = float(eta)
  if not 0.0 < eta <= 1.0:
    raise ValueError(
        f"eta={eta}: must lie in (0, 1]; 1 is the memoryless DDPM chain, and "
        "eta = 0 (deterministic DDIM) has no control cost (eq. 2 divides by σ_k)"
    )
  return eta


def step_mean(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    cond: Any,
    *,
    eta: float = 1.0,
    clip_sample=None,
) -> jax.Array:
  """μ(x, k) of eq. 1: the DDIM mean (samplers eqs. 1, 3) for [B] timesteps t → prev_t."""
  out = samplers.ddim_step(
      schedule, eps_fn(x, t, cond), x, t, prev_t, eta, prev_sample=x, clip_sample=clip_sample
  )
  return out.mean


def sample_chain(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    cond: Any,
    key: jax.Array,
    *,
    shape: tuple[int, ...],
    num_steps: int,
    eta: float = 1.0,
    clip_sample=None,
) -> samplers.Trajectory:
  """Stop-gradient trajectory of the fine-tuned chain (eq. 1; eta = 1 is memoryless)."""
  traj = samplers.sample(
      eps_fn,
      schedule,
      cond,
      key,
      shape=shape,
      num_steps=num_steps,
      eta=_check_eta(eta),
      clip_sample=clip_sample,
  )
  return jax.lax.stop_gradient(traj)


def terminal_adjoint(reward_fn: CondRewardFn, x: jax.Array, cond: Any, lam) -> jax.Array:
  """ã_K = −λ ∇r(X_K) of eq. 5 (per example: r is applied row by row)."""
  return -lam * jax.grad(lambda y: jnp.sum(reward_fn(y, cond)))(x)


def lean_adjoint(
    base_eps_fn: EpsFn,
    schedule: NoiseSchedule,
    traj: samplers.Trajectory,
    terminal: jax.Array,
    *,
    eta: float = 1.0,
    clip_sample=None,
) -> jax.Array:
  """ã_0..ã_K [B, K+1, ...] of eq. 5: a backward `lax.scan` of VJPs of the BASE mean map."""
  if terminal.shape != traj.final.shape:
    raise ValueError(f"terminal.shape={terminal.shape}: must equal X_K's {traj.final.shape}")
  eta = _check_eta(eta)
  batch = terminal.shape[0]

  def step(a_next, k):
    t = jnp.full((batch,), traj.timesteps[k], jnp.int32)
    prev_t = jnp.full((batch,), traj.prev_timesteps[k], jnp.int32)
    mean_fn = lambda y: step_mean(
        base_eps_fn, schedule, y, t, prev_t, traj.cond, eta=eta, clip_sample=clip_sample
    )
    _, vjp = jax.vjp(mean_fn, traj.latents[:, k])
    a = vjp(a_next)[0]  # eq. 5
    return a, a

  _, adj = jax.lax.scan(step, terminal, jnp.arange(traj.num_steps), reverse=True)
  adj = jnp.concatenate([jnp.moveaxis(adj, 0, 1), terminal[:, None]], axis=1)
  return jax.lax.stop_gradient(adj)


def control(mean: jax.Array, base_mean: jax.Array, std: jax.Array) -> jax.Array:
  """u = (μ_θ − μ_base)/σ of eq. 2; std [B] > 0."""
  return (mean - base_mean) * expand_like(1.0 / std, mean)


class Pairs(NamedTuple):
  """The (sample, step) pairs of eq. 8, flattened sample-major: every leaf is [P, ...]."""

  x: jax.Array  # X_k
  adjoint: jax.Array  # ã_{k+1}
  t: jax.Array  # τ_k
  prev_t: jax.Array  # prev(τ_k)
  cond: Any  # the sample's condition, repeated


def select_pairs(
    traj: samplers.Trajectory, adjoint: jax.Array, key: jax.Array | None, num_timesteps
) -> tuple[Pairs, int]:
  """(the B·M pairs of eq. 8, M): M of the K steps per trajectory (`loss_timesteps`)."""
  batch, num_steps = traj.latents.shape[0], traj.num_steps
  idx = loss_timesteps(key, batch, num_steps, num_timesteps)
  m = idx.shape[1]
  take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
  x = take(traj.latents[:, :-1]).reshape((batch * m,) + traj.latents.shape[2:])
  a = take(adjoint[:, 1:]).reshape(x.shape)  # ã_{k+1}, eq. 6
  t, prev_t = traj.timesteps[idx].reshape(-1), traj.prev_timesteps[idx].reshape(-1)
  cond = jax.tree_util.tree_map(lambda c: jnp.repeat(c, m, axis=0), traj.cond)  # sample-major
  return Pairs(x, a, t, prev_t, cond), m


def pair_losses(
    eps_fn: EpsFn,
    base_eps_fn: EpsFn,
    schedule: NoiseSchedule,
    pairs: Pairs,
    *,
    loss_clip: float,
    eta: float,
    clip_sample=None,
):
  """Per-pair terms of eq. 8, each [P]: (ℓ_p = 1[σ_k > 0] min(‖u_k + σ_k ã_{k+1}‖², C),
  the unclipped ‖u_k + σ_k ã_{k+1}‖², the stochastic mask σ_k > 0)."""
  x, a, t, prev_t, cond = pairs
  std = samplers.ddim_std(schedule, t, prev_t, eta)  # samplers eq. 2
  stochastic = std > 0
  safe_std = jnp.where(stochastic, std, 1.0)
  mean = step_mean(eps_fn, schedule, x, t, prev_t, cond, eta=eta, clip_sample=clip_sample)
  base_mean = step_mean(base_eps_fn, schedule, x, t, prev_t, cond, eta=eta, clip_sample=clip_sample)
  u = control(mean, base_mean, safe_std)  # eq. 2
  res = u + expand_like(safe_std, a) * a  # eq. 6
  sq = jnp.sum(jnp.square(res).reshape(res.shape[0], -1), axis=-1)
  per = jnp.where(stochastic, jnp.minimum(sq, loss_clip), 0.0)  # eq. 8
  return per, sq, stochastic


def _aux_sums(sq: jax.Array, stochastic: jax.Array, loss_clip: float) -> dict:
  """Numerators and denominator of the aux metrics over a set of pairs (summed over chunks)."""
  return {
      "clipped": jnp.sum(stochastic & (sq > loss_clip)),
      "residual": jnp.sum(jnp.where(stochastic, sq, 0.0)),
      "count": jnp.sum(stochastic),
  }


def _aux(sums: dict) -> dict:
  """{"clip_fraction", "residual"} over the stochastic pairs, from `_aux_sums` of all pairs."""
  count = jnp.maximum(sums["count"], 1)
  return {"clip_fraction": sums["clipped"] / count, "residual": sums["residual"] / count}


def _check_loss_clip(loss_clip) -> None:
  if not loss_clip > 0:
    raise ValueError(f"loss_clip={loss_clip!r}: must be > 0 (math.inf disables clipping)")


def adjoint_matching_loss(
    eps_fn: EpsFn,
    base_eps_fn: EpsFn,
    schedule: NoiseSchedule,
    traj: samplers.Trajectory,
    adjoint: jax.Array,
    key: jax.Array | None = None,
    *,
    num_timesteps: int | None = None,
    loss_clip: float = math.inf,
    eta: float = 1.0,
    clip_sample=None,
):
  """Eq. 8: returns (loss, aux) with aux {"clip_fraction", "residual"} over stochastic steps.

  key is needed only when subsampling (num_timesteps < K; None uses all K steps).
  """
  _check_loss_clip(loss_clip)
  eta = _check_eta(eta)
  pairs, m = select_pairs(traj, adjoint, key, num_timesteps)
  per, sq, stochastic = pair_losses(
      eps_fn, base_eps_fn, schedule, pairs, loss_clip=loss_clip, eta=eta, clip_sample=clip_sample
  )
  loss = jnp.sum(per) * (traj.num_steps / m) / traj.latents.shape[0]  # eq. 8
  return loss, _aux(_aux_sums(sq, stochastic, loss_clip))


def split_pairs(pairs: Pairs, num_microbatches: int, batch: int, m: int) -> Pairs:
  """The chunks of eq. 9: leaves [n, P/n, ...], chunk j the pairs p ≡ j (mod n)."""
  size, n = batch * m, num_microbatches
  if size % n:
    raise ValueError(
        f"num_microbatches={n}: must divide the B*M = {batch}*{m} = {size} (sample, step) "
        f"pairs of eq. 8 (B = batch size, M = num_timesteps)"
    )
  split = lambda leaf: jnp.swapaxes(leaf.reshape((size // n, n) + leaf.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, pairs)


def accumulated_value_and_grad(
    eps_fn_builder: Callable,
    params,
    frozen,
    base_eps_fn: EpsFn,
    schedule: NoiseSchedule,
    traj: samplers.Trajectory,
    adjoint: jax.Array,
    key: jax.Array | None = None,
    *,
    num_microbatches: int,
    num_timesteps: int | None = None,
    loss_clip: float = math.inf,
    eta: float = 1.0,
    clip_sample=None,
):
  """Eq. 9: ((loss, aux), grads) of `adjoint_matching_loss` with ε_θ = eps_fn_builder(params,
  frozen), its gradient summed over `num_microbatches` chunks of the pairs in a `lax.scan`;
  equal to `jax.value_and_grad` of the unchunked loss up to float rounding."""
  _check_loss_clip(loss_clip)
  eta = _check_eta(eta)
  batch = traj.latents.shape[0]
  pairs, m = select_pairs(traj, adjoint, key, num_timesteps)  # once, as unchunked
  chunks = split_pairs(pairs, num_microbatches, batch, m)
  weight = traj.num_steps / m

  def chunk_loss(p, chunk):
    per, sq, stochastic = pair_losses(
        eps_fn_builder(p, frozen),
        base_eps_fn,
        schedule,
        chunk,
        loss_clip=loss_clip,
        eta=eta,
        clip_sample=clip_sample,
    )
    return jnp.sum(per) * weight / batch, _aux_sums(sq, stochastic, loss_clip)  # eq. 9

  grad_fn = jax.value_and_grad(chunk_loss, has_aux=True)

  def body(carry, chunk):
    return jax.tree_util.tree_map(jnp.add, carry, grad_fn(params, chunk)), None

  first = jax.tree_util.tree_map(lambda c: c[0], chunks)
  value_shapes, _ = jax.eval_shape(grad_fn, params, first)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), value_shapes)
  init = (zeros, jax.tree_util.tree_map(jnp.zeros_like, params))
  ((loss, sums), grads), _ = jax.lax.scan(body, init, chunks)
  return (loss, _aux(sums)), grads


def make_update_fn(
    eps_fn_builder: Callable,
    base_eps_fn_builder: Callable,
    reward_fn_builder: Callable,
    schedule: NoiseSchedule,
    optimizer: optax.GradientTransformation,
    *,
    lam: float,
    num_steps: int,
    shape: tuple[int, ...],
    eta: float = 1.0,
    clip_sample=None,
    num_timesteps: int | None = None,
    loss_clip: float = math.inf,
    num_microbatches: int = 1,
):
  """Builds `update(state, frozen, key, cond) -> (state, metrics)`, one Adjoint Matching step.

  `eps_fn_builder(trainable, frozen)` gives ε_θ and `base_eps_fn_builder(frozen)` the frozen
  ε_base (EpsFns, guidance included if wanted); `reward_fn_builder(frozen)` gives the
  differentiable r(x [B, ...], cond) -> [B] (x in the model's space; reward weights are
  frozen arguments, not constants of the compiled step). cond is a pytree of [B, ...] leaves
  (`samplers.batch_size`). One step samples B chains of shape [B, *shape] from ε_θ (eq. 1,
  stop-gradient), solves eq. 5 and takes one optimizer step on eq. 8. Pure: jit it,
  donating the state.

  num_microbatches n > 1 accumulates the gradient over n chunks of the B·M (sample, step)
  pairs (eq. 9, `accumulated_value_and_grad`): the same loss, gradient and metrics up to float
  rounding, with 1/n of the pairs in the model's backward pass at once. n must divide B·M
  (checked when the update is traced); n = 1 differentiates all pairs at once (no scan).
  """
  eta = _check_eta(eta)
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: must be a Python int >= 1")
  if (
      isinstance(num_microbatches, bool)
      or not isinstance(num_microbatches, int)
      or num_microbatches < 1
  ):
    raise ValueError(f"num_microbatches={num_microbatches!r}: must be a Python int >= 1")
  n, offset = schedule.num_train_timesteps, schedule.steps_offset
  stds = np.asarray(
      samplers.ddim_std(
          schedule,
          inference_timesteps(n, num_steps, offset),
          inference_prev_timesteps(n, num_steps, offset),
          eta,
      )
  )
  if not np.any(stds > 0):
    raise ValueError(
        f"num_steps={num_steps}, eta={eta}: no step of the chain is stochastic, "
        "so the control (eq. 2) is undefined everywhere"
    )

  def update(state: TrainState, frozen, key: jax.Array, cond: Any):
    k_chain, k_sub = jax.random.split(key)
    base_eps, reward_fn = base_eps_fn_builder(frozen), reward_fn_builder(frozen)
    traj = sample_chain(
        eps_fn_builder(state.params, frozen),
        schedule,
        cond,
        k_chain,
        shape=shape,
        num_steps=num_steps,
        eta=eta,
        clip_sample=clip_sample,
    )
    terminal = terminal_adjoint(reward_fn, traj.final, traj.cond, lam)
    adj = lean_adjoint(base_eps, schedule, traj, terminal, eta=eta, clip_sample=clip_sample)

    def loss_fn(params):
      return adjoint_matching_loss(
          eps_fn_builder(params, frozen),
          base_eps,
          schedule,
          traj,
          adj,
          k_sub,
          num_timesteps=num_timesteps,
          loss_clip=loss_clip,
          eta=eta,
          clip_sample=clip_sample,
      )

    if num_microbatches == 1:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    else:
      (loss, aux), grads = accumulated_value_and_grad(
          eps_fn_builder,
          state.params,
          frozen,
          base_eps,
          schedule,
          traj,
          adj,
          k_sub,
          num_microbatches=num_microbatches,
          num_timesteps=num_timesteps,
          loss_clip=loss_clip,
          eta=eta,
          clip_sample=clip_sample,
      )
    metrics = {
        "loss": loss,
        "reward": jnp.mean(reward_fn(traj.final, traj.cond)),
        "grad_norm": optax.tree.norm(grads),
        **aux,
    }
    return state.apply_gradients(grads, optimizer), metrics

  return update
