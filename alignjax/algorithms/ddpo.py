"""DDPO: reinforcement learning over the denoising chain (Black, Janner, Du, Kostrikov, Levine
2023, "Training Diffusion Models with Reinforcement Learning").

DDIM sampling with eta > 0 makes every denoising step a Gaussian policy over a T-step MDP whose
only reward r(x_0, c) arrives at the end:

  (1)  π_θ(x_{t-1} | x_t, c) = N(x_{t-1}; μ_θ(x_t, t, c), σ_t² I).

With classifier-free guidance μ_θ uses the guided prediction
ε̃ = ε_θ(x_t, ∅) + w (ε_θ(x_t, c) − ε_θ(x_t, ∅)), at sampling time and inside the loss alike.
log π is the per-dimension mean of the Gaussian log-density (the DDPO convention).

Advantages, normalised per prompt (DDPO §5, "per-prompt stat tracking"):

  (2)  A_i = (r_i − m_c) / (s_c + 1e-6), with m_c, s_c the mean and std of the last
       `buffer_size` rewards of prompt c = c_i, or of the whole batch while c has fewer
       than `min_count` of them;
  (3)  A_i ← clip(A_i, −A_max, A_max).

Losses over (sample, step) pairs, with ρ = exp(log π_θ − log π_old):

  (4)  DDPO-SF:  L = −E[A · log π_θ(x_{t-1} | x_t, c)]  (one step per round: REINFORCE),
  (5)  DDPO-IS:  L = E[max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))]  (PPO's clipped surrogate).

Diagnostics:

  (6)  approx_kl = ½ E[(log π_θ − log π_old)²],   clipfrac = E[ |ρ − 1| > ε ].

Which steps train. A step with σ_t = 0 (samplers eq. 2: every step when eta = 0, and the last
one when the chain ends at abar = 1, the default `set_alpha_to_one=True`, e.g. the digits'
"linear" schedule) is deterministic: its log π is defined as 0 (samplers eq. 6), so ρ = 1 and
its gradient is 0 in (4)-(5); it would only dilute the means of (4)-(6). Only the stochastic
steps train, and `timestep_fraction` f is a fraction of those:

  (7)  S = {i : σ_{τ_i} > 0} (0-based trajectory steps, τ_i the i-th inference timestep),
       n = max(1, ⌊f · |S|⌋) steps per sample, drawn uniformly without replacement from S.

S depends only on the schedule, T and eta, so it is computed on the host while tracing
(`stochastic_steps`) and n is static. With every step stochastic (Stable Diffusion's
set_alpha_to_one=False, steps_offset=1) S is all T steps and (7) draws exactly as before.

One inner epoch shuffles the samples, draws n steps of S for every sample (independently per
sample), flattens samples × steps into one batch per minibatch, and takes one optimizer step
per minibatch — all inside one jitted program.
"""

from __future__ import annotations

import collections
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignjax.diffusion import samplers, schedules
from alignjax.diffusion.schedules import NoiseSchedule
from alignjax.training import TrainState

OBJECTIVES = ("clipped", "score_function")
MINIBATCH_LOOPS = ("unrolled", "scan")
ADVANTAGE_EPS = 1e-6


# --------------------------------------------------------------------------- advantages


class PerPromptStatTracker:
  """Running reward statistics per prompt, eq. (2). Plain numpy with explicit, checkpointable state."""

  def __init__(self, buffer_size: int, min_count: int):
    if buffer_size <= 0 or min_count <= 0:
      raise ValueError(f"buffer_size={buffer_size}, min_count={min_count}: both must be > 0")
    if min_count > buffer_size:
      raise ValueError(f"min_count={min_count} can never be reached with buffer_size={buffer_size}")
    self.buffer_size = buffer_size
    self.min_count = min_count
    self._buffers: dict[str, collections.deque] = {}

  def update(self, prompts: Sequence, rewards: np.ndarray) -> np.ndarray:
    """Adds this batch's rewards and returns their advantages, eq. (2)."""
    rewards = np.asarray(rewards, np.float64)
    keys = [str(p) for p in np.asarray(prompts).tolist()]
    if len(keys) != rewards.shape[0]:
      raise ValueError(f"{len(keys)} prompts for {rewards.shape[0]} rewards")
    advantages = np.empty_like(rewards)
    for key in dict.fromkeys(keys):
      idx = np.array([i for i, k in enumerate(keys) if k == key])
      buffer = self._buffers.setdefault(key, collections.deque(maxlen=self.buffer_size))
      buffer.extend(rewards[idx].tolist())
      stats_from = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
      advantages[idx] = (rewards[idx] - stats_from.mean()) / (stats_from.std() + ADVANTAGE_EPS)
    return advantages.astype(np.float32)

  def state_dict(self) -> dict:
    return {
        "buffer_size": self.buffer_size,
        "min_count": self.min_count,
        "buffers": {k: list(v) for k, v in self._buffers.items()},
    }

  @classmethod
  def from_state_dict(cls, state: Mapping) -> "PerPromptStatTracker":
    tracker = cls(int(state["buffer_size"]), int(state["min_count"]))
    for key, values in state["buffers"].items():
      tracker._buffers[key] = collections.deque(values, maxlen=tracker.buffer_size)
    return tracker


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
  """Eq. (2) with the whole batch as the only group (no per-prompt tracking)."""
  rewards = np.asarray(rewards, np.float64)
  return ((rewards - rewards.mean()) / (rewards.std() + ADVANTAGE_EPS)).astype(np.float32)


# --------------------------------------------------------------------------- losses


def score_function_loss(log_prob: jax.Array, advantages: jax.Array) -> jax.Array:
  """Eq. (4): −mean(A · log π_θ)."""
  return -jnp.mean(advantages * log_prob)


def clipped_surrogate_loss(
    log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, clip_range: float
) -> jax.Array:
  """Eq. (5): mean(max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)))."""
  ratio = jnp.exp(log_prob - old_log_prob)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return jnp.mean(jnp.maximum(unclipped, clipped))


def policy_diagnostics(log_prob, old_log_prob, clip_range) -> dict[str, jax.Array]:
  """Eq. (6) plus the importance ratio's mean and extremes."""
  log_ratio = log_prob - old_log_prob
  ratio = jnp.exp(log_ratio)
  return {
      "approx_kl": 0.5 * jnp.mean(log_ratio**2),
      "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
      "ratio_mean": jnp.mean(ratio),
      "ratio_min": jnp.min(ratio),
      "ratio_max": jnp.max(ratio),
  }


# --------------------------------------------------------------------------- training pairs


def stochastic_steps(schedule: NoiseSchedule, num_steps: int, eta: float) -> np.ndarray:
  """S of rule (7): the indices (ascending ints) of the T-step chain's steps with σ > 0.

  Evaluated on the host with the sampler's own σ (samplers.ddim_std) at the sampler's
  inference timesteps, so it agrees with the trajectory's `stds`; the schedule and eta must be
  concrete (also when called while tracing).
  """
  n, offset = schedule.num_train_timesteps, schedule.steps_offset
  t = schedules.inference_timesteps(n, num_steps, offset)
  prev_t = schedules.inference_prev_timesteps(n, num_steps, offset)
  try:
    with jax.ensure_compile_time_eval():
      std = np.asarray(samplers.ddim_std(schedule, t, prev_t, eta))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(
        "stochastic_steps needs a concrete schedule and eta (they decide statically which "
        "steps train, rule (7)); build the epoch function outside jit"
    ) from e
  return np.flatnonzero(std > 0)


def num_train_steps(
    num_steps: int,
    timestep_fraction: float,
    *,
    schedule: NoiseSchedule | None = None,
    eta: float = 1.0,
) -> int:
  """n of rule (7): how many steps of a T-step trajectory train per sample and epoch (>= 1).

  With `schedule` (and the sampler's eta) n counts only the stochastic steps S; without it
  every one of the T steps is taken to be stochastic (true of Stable Diffusion's schedule,
  not of a schedule ending at abar = 1 such as the digits' "linear" one, where |S| = T − 1).
  """
  if not 0.0 < timestep_fraction <= 1.0:
    raise ValueError(f"timestep_fraction={timestep_fraction}: must lie in (0, 1]")
  trainable = num_steps if schedule is None else len(stochastic_steps(schedule, num_steps, eta))
  if trainable == 0:
    raise ValueError(
        f"none of the {num_steps} denoising steps is stochastic (σ = 0 for all, eta={eta}): "
        "DDPO has no policy gradient to follow; use eta > 0 and more steps, or a schedule "
        "with set_alpha_to_one=False"
    )
  return max(1, int(trainable * timestep_fraction))  # rule (7)


def training_pairs(
    traj: samplers.Trajectory,
    advantages: jax.Array,
    key: jax.Array,
    *,
    timestep_fraction: float,
    num_minibatches: int,
    steps: Sequence[int] | np.ndarray | None = None,
) -> dict[str, jax.Array]:
  """Shuffled (sample, step) pairs, shaped [num_minibatches, pairs_per_minibatch, ...].

  A minibatch holds B / num_minibatches whole samples with n randomly chosen steps of S each
  (rule 7), so one optimizer step sees every training step of its samples, as in DDPO.

  steps: S, the trajectory steps that may train (static ints), normally
    `stochastic_steps(schedule, T, eta)`; None reads it from `traj.stds > 0`, which needs a
    concrete trajectory (not under jit).
  """
  batch, num_steps = traj.log_probs.shape
  if batch % num_minibatches:
    raise ValueError(f"batch {batch} does not split into num_minibatches={num_minibatches}")
  if steps is None:
    try:
      steps = np.flatnonzero(np.asarray(traj.stds) > 0)
    except jax.errors.TracerArrayConversionError as e:
      raise ValueError(
          "training_pairs under jit needs steps=stochastic_steps(schedule, T, eta) "
          "(which steps train is decided statically, rule (7))"
      ) from e
  steps = np.asarray(steps, np.int32)
  if steps.size == 0:
    raise ValueError(f"no step of the {num_steps} may train: all have σ = 0 (rule 7)")
  if (
      steps.ndim != 1
      or len(np.unique(steps)) != steps.size
      or not (0 <= steps.min() and steps.max() < num_steps)
  ):
    raise ValueError(f"steps={steps.tolist()}: need distinct step indices in [0, {num_steps})")
  if not 0.0 < timestep_fraction <= 1.0:
    raise ValueError(f"timestep_fraction={timestep_fraction}: must lie in (0, 1]")
  n_train = max(1, int(steps.size * timestep_fraction))  # rule (7)
  key_samples, key_steps = jax.random.split(key)
  rows = jax.random.permutation(key_samples, batch)
  step_keys = jax.random.split(key_steps, batch)
  # With S = all T steps, jnp.asarray(steps)[perm] = perm: the same draws as without (7).
  pick = lambda k: jnp.asarray(steps)[jax.random.permutation(k, steps.size)[:n_train]]
  steps = jax.vmap(pick)(step_keys)
  rows = jnp.broadcast_to(rows[:, None], steps.shape)
  pairs = {
      "x_t": traj.latents[rows, steps],
      "x_prev": traj.latents[rows, steps + 1],
      "t": traj.timesteps[steps],
      "prev_t": traj.prev_timesteps[steps],
      "old_log_prob": traj.log_probs[rows, steps],
      "cond": jax.tree_util.tree_map(lambda c: c[rows], traj.cond),  # a pytree of [B, ...]
      "advantages": advantages[rows],
  }
  return jax.tree_util.tree_map(lambda x: x.reshape((num_minibatches, -1) + x.shape[2:]), pairs)


# --------------------------------------------------------------------------- update


def make_epoch_fn(
    eps_fn_builder: Callable,
    schedule: NoiseSchedule,
    optimizer: optax.GradientTransformation,
    *,
    objective: str,
    clip_range: float,
    eta: float,
    guidance_scale: float,
    null_cond: int,
    timestep_fraction: float,
    num_minibatches: int,
    num_microbatches: int = 1,
    clip_sample: float | None = None,
    mesh: Mesh | None = None,
    data_axes: tuple[str, ...] = ("data", "fsdp"),
    minibatch_loop: str = "unrolled",
):
  """Builds `epoch(state, frozen, traj, advantages) -> (state, metrics)`, one inner epoch.

  `eps_fn_builder(trainable, frozen)` returns the model's unguided EpsFn; guidance is applied
  here exactly as at sampling time. Jit the result with the state donated. Each minibatch's
  gradient is accumulated over `num_microbatches` chunks (a `lax.scan`) to bound memory.
  Only the stochastic steps of `schedule` at `eta` train (rule 7): a minibatch holds
  B / num_minibatches × num_train_steps(T, timestep_fraction, schedule=schedule, eta=eta)
  pairs, which num_microbatches must divide.

  minibatch_loop: "unrolled" (default) writes the minibatch steps one after the other into
  the program; "scan" loops over them with `lax.scan` (a program whose size does not grow with
  num_minibatches, but XLA:CPU runs a conv net's gradient ~9x slower inside a loop:
  `python -m benchmarks.ddpo_epoch`).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}: valid choices are {OBJECTIVES}")
  if minibatch_loop not in MINIBATCH_LOOPS:
    raise ValueError(f"minibatch_loop={minibatch_loop!r}: valid choices are {MINIBATCH_LOOPS}")
  if eta <= 0:
    raise ValueError(f"eta={eta}: DDPO needs a stochastic sampler (eta > 0) for log-probs")

  def constrain(tree, spec):
    if mesh is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, spec))

  def loss_fn(trainable, frozen, chunk):
    eps_fn = samplers.classifier_free_guidance(
        eps_fn_builder(trainable, frozen), guidance_scale, null_cond
    )
    log_prob = samplers.step_log_prob(
        eps_fn,
        schedule,
        chunk["x_t"],
        chunk["x_prev"],
        chunk["t"],
        chunk["prev_t"],
        chunk["cond"],
        eta,
        clip_sample=clip_sample,
    )
    if objective == "clipped":
      loss = clipped_surrogate_loss(
          log_prob, chunk["old_log_prob"], chunk["advantages"], clip_range
      )
    else:
      loss = score_function_loss(log_prob, chunk["advantages"])
    return loss, {"loss": loss, **policy_diagnostics(log_prob, chunk["old_log_prob"], clip_range)}

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def minibatch_step(carry, minibatch):
    state, frozen = carry
    chunks = jax.tree_util.tree_map(
        lambda x: x.reshape((num_microbatches, -1) + x.shape[1:]), minibatch
    )
    chunks = constrain(chunks, P(None, data_axes))

    def accumulate(grads, chunk):
      chunk_grads, diag = grad_fn(state.params, frozen, chunk)
      return jax.tree_util.tree_map(jnp.add, grads, chunk_grads), diag

    if num_microbatches == 1:  # no loop (see minibatch_loop)
      grads, diag = grad_fn(state.params, frozen, jax.tree_util.tree_map(lambda x: x[0], chunks))
      diags = jax.tree_util.tree_map(lambda v: v[None], diag)
    else:
      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      grads, diags = jax.lax.scan(accumulate, zeros, chunks)
      grads = jax.tree_util.tree_map(lambda g: g / num_microbatches, grads)
    metrics = {k: jnp.mean(v) for k, v in diags.items()}
    metrics["ratio_min"] = jnp.min(diags["ratio_min"])
    metrics["ratio_max"] = jnp.max(diags["ratio_max"])
    metrics["grad_norm"] = optax.tree.norm(grads)
    return (state.apply_gradients(grads, optimizer), frozen), metrics

  def epoch(state: TrainState, frozen, traj: samplers.Trajectory, advantages: jax.Array):
    key = jax.random.fold_in(state.key, state.step)
    batch, num_steps = traj.log_probs.shape
    trainable_steps = stochastic_steps(schedule, num_steps, eta)  # rule (7), static
    n_train = num_train_steps(num_steps, timestep_fraction, schedule=schedule, eta=eta)
    samples = batch // num_minibatches
    if batch % num_minibatches == 0 and (samples * n_train) % num_microbatches:
      raise ValueError(
          f"num_microbatches={num_microbatches} must divide the {samples * n_train} (sample, "
          f"step) pairs of a minibatch: {samples} samples × {n_train} of the "
          f"{len(trainable_steps)} stochastic steps (rule 7)"
      )
    pairs = training_pairs(
        traj,
        advantages,
        key,
        timestep_fraction=timestep_fraction,
        num_minibatches=num_minibatches,
        steps=trainable_steps,
    )
    pairs = constrain(pairs, P(None, data_axes))
    if minibatch_loop == "scan":
      (state, _), metrics = jax.lax.scan(minibatch_step, (state, frozen), pairs)
      return state, metrics
    carry, per_minibatch = (state, frozen), []
    for i in range(num_minibatches):
      carry, mb_metrics = minibatch_step(carry, jax.tree_util.tree_map(lambda x: x[i], pairs))
      per_minibatch.append(mb_metrics)
    metrics = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *per_minibatch)
    return carry[0], metrics

  return epoch
