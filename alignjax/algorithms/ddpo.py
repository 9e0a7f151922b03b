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

One inner epoch shuffles the samples, draws a random subset of `timestep_fraction · T` steps
for every sample (independently per sample), flattens samples × steps into one batch per
minibatch, and takes one optimizer step per minibatch — all inside one jitted program.
"""

from __future__ import annotations

import collections
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignjax.diffusion import samplers
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


def num_train_steps(num_steps: int, timestep_fraction: float) -> int:
  """How many of a trajectory's T steps train per sample and epoch (at least one)."""
  if not 0.0 < timestep_fraction <= 1.0:
    raise ValueError(f"timestep_fraction={timestep_fraction}: must lie in (0, 1]")
  return max(1, int(num_steps * timestep_fraction))


def training_pairs(
    traj: samplers.Trajectory,
    advantages: jax.Array,
    key: jax.Array,
    *,
    timestep_fraction: float,
    num_minibatches: int,
) -> dict[str, jax.Array]:
  """Shuffled (sample, step) pairs, shaped [num_minibatches, pairs_per_minibatch, ...].

  A minibatch holds B / num_minibatches whole samples with `num_train_steps` randomly chosen
  steps each, so one optimizer step sees every training step of its samples, as in DDPO.
  """
  batch, num_steps = traj.log_probs.shape
  if batch % num_minibatches:
    raise ValueError(f"batch {batch} does not split into num_minibatches={num_minibatches}")
  n_train = num_train_steps(num_steps, timestep_fraction)
  key_samples, key_steps = jax.random.split(key)
  rows = jax.random.permutation(key_samples, batch)
  step_keys = jax.random.split(key_steps, batch)
  steps = jax.vmap(lambda k: jax.random.permutation(k, num_steps)[:n_train])(step_keys)
  rows = jnp.broadcast_to(rows[:, None], steps.shape)
  pairs = {
      "x_t": traj.latents[rows, steps],
      "x_prev": traj.latents[rows, steps + 1],
      "t": traj.timesteps[steps],
      "prev_t": traj.prev_timesteps[steps],
      "old_log_prob": traj.log_probs[rows, steps],
      "cond": traj.cond[rows],
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
    pairs = training_pairs(
        traj, advantages, key, timestep_fraction=timestep_fraction, num_minibatches=num_minibatches
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
