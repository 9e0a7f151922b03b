"""SPO, Self-Play Preference Optimization (Swamy, Dann, Kidambi, Wu, Agarwal 2024, "A
Minimaximalist Approach to Reinforcement Learning from Human Feedback"): the LM loss and the
tabular self-play dynamics.

LM loss. Each prompt gets k ≥ 2 responses from the current policy π_θ (a batch of
B = num_prompts × k rows, the k responses of one prompt contiguous, as in `policy_gradient`).
A judge scores every ordered pair of one prompt's responses, W[g, i, j] = P(y_gi ≻ y_gj) ∈ [0, 1]
(the diagonal is ignored). Each response's reward is its mean win-rate against the others:

  (1)  r_gi = (1 / (k − 1)) Σ_{j≠i} W[g, i, j],

and the update is an ordinary policy gradient on r (`policy_gradient` eqs. 1-6), whose objective
at the current iterate is the win-rate against the policy itself, the opponent frozen:

  (2)  J(θ') = E_{y~π_θ'}[P(y ≻ π_θ)]  at θ' = θ  (gradient ∇_θ' only).

(The game value P(π_θ ≻ π_θ) = ½ is constant; self-play means the opponent is the current policy
but not differentiated.) For an antisymmetric judge (W + Wᵀ = 1) the rewards of a group sum to
Σ_i r_i = k/2, so the group mean is exactly ½ and the advantages of `policy_gradient` eqs. (1)-(2)
are

  (3)  "centred" (Dr. GRPO):  A_i = r_i − mean_g r = r_i − ½,
       "rloo":                A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j = k/(k−1) (r_i − ½),
       "normalised" (GRPO):   A_i = (r_i − ½) / (std_g r + eps).

  (4)  Exact expectations (y_1..k iid π_θ; checked by enumeration in tests/algorithms/test_spo.py):
       E[r_i ∇ log π(y_i)] = ∇J (y_j, j ≠ i, independent of y_i); the leave-one-out baseline
       is not independent of y_i (r_j contains W[j, i]): E[r_j ∇ log π(y_i)] = −∇J / (k − 1).
       So "centred" is unbiased, E[∇ REINFORCE loss] = −∇J, "rloo" gives −k/(k−1) ∇J (a constant
       step-size factor, unlike RLOO on fixed rewards), and "normalised" a sample-dependent scale.

`spo_loss` feeds these advantages to `policy_gradient.grpo_loss` (clipped importance ratio against
the sampling policy, optional k3 KL to a reference; with kl_coef > 0 note `policy_gradient`
eq. 12). With ρ = 1, kl_coef = 0 and length_norm="constant" its gradient is 1/T times the
REINFORCE one (`policy_gradient` eq. 11), T the padded length. A position-biased judge
(W + Wᵀ ≠ 1) should be symmetrised first, W ← ½ (W + 1 − Wᵀ); (3)-(4) assume antisymmetry.

Tabular SPO: self-play with a no-regret learner (Hedge / multiplicative weights), the policy
playing against itself on the payoff P(y ≻ π_t) − ½ (games.py eq. 2):

  (5)  π_{t+1}(y) ∝ π_t(y) exp(η (P(y ≻ π_t) − ½)),  π̄_T = (1/T) Σ_{t<T} π_t.

Since π_tᵀ (P − ½) π_t = 0, exploitability(π̄_T) = max_y P(y ≻ π̄_T) − ½ is exactly the learner's
average regret, ≤ max_y ln(1 / π_0(y)) / (η T) + η / 8 for Hedge with payoffs in an interval of
length 1; from a uniform π_0 with η = sqrt(8 ln n / T) the bound is sqrt(ln n / (2T)): the average
iterate converges to a minimax winner (the paper's result on self-play with a no-regret
algorithm, as I read it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from alignjax.algorithms import games
from alignjax.algorithms import policy_gradient as pg

__all__ = ["ADVANTAGES", "self_play", "spo_loss", "spo_rewards"]

ADVANTAGES = ("centred", "rloo", "normalised")


def spo_rewards(win_matrix: jax.Array) -> jax.Array:
  """Eq. (1): W [num_prompts, k, k] (or [k, k] for one prompt) -> rewards r [num_prompts · k]."""
  w = jnp.asarray(win_matrix, jnp.float32)
  if w.ndim == 2:
    w = w[None]
  if w.ndim != 3 or w.shape[1] != w.shape[2]:
    raise ValueError(f"win_matrix: shape {w.shape} must be [num_prompts, k, k] or [k, k]")
  k = w.shape[1]
  if k < 2:
    raise ValueError(f"win_matrix: k={k} responses per prompt; SPO needs k >= 2")
  values = games._concrete(w)
  if values is not None and not ((values >= 0) & (values <= 1)).all():
    raise ValueError(f"win_matrix: must lie in [0, 1]; got {values.min()}..{values.max()}")
  off_diagonal = 1.0 - jnp.eye(k, dtype=w.dtype)
  return (jnp.sum(w * off_diagonal, axis=2) / (k - 1)).reshape(-1)


def spo_loss(
    policy_logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    win_matrix: jax.Array,
    mask: jax.Array,
    *,
    advantage: str = "centred",
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    length_norm: str = "constant",
    eps: float = 1e-4,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eqs. (1), (3) and `policy_gradient.grpo_loss`: (loss, grpo metrics + reward_mean).

  Log-probs and mask [B, T] with B = num_prompts · k; win_matrix [num_prompts, k, k]; advantage
  in ADVANTAGES (eps is GRPO's std floor, "normalised" only). All coefficients are static.
  """
  if advantage not in ADVANTAGES:
    raise ValueError(f"advantage={advantage!r}: valid choices are {ADVANTAGES}")
  rewards = spo_rewards(win_matrix)
  k = jnp.shape(win_matrix)[-1]
  if advantage == "rloo":
    adv = pg.rloo_advantages(rewards, k)
  else:
    adv = pg.group_advantages(rewards, k, normalize_std=advantage == "normalised", eps=eps)
  loss, metrics = pg.grpo_loss(
      policy_logp,
      old_logp,
      ref_logp,
      adv,
      mask,
      clip_eps=clip_eps,
      kl_coef=kl_coef,
      length_norm=length_norm,
  )
  return loss, {**metrics, "reward_mean": jnp.mean(rewards)}


@functools.partial(jax.jit, static_argnames=("eta", "steps"))
def _self_play(logits, p, eta, steps):
  def step(carry, _):
    logits, total = carry
    pi = jnp.exp(logits)
    total = total + pi
    logits = jax.nn.log_softmax(logits + eta * (p @ pi - 0.5))  # eq. (5)
    return (logits, total), (pi, total)

  zeros = jnp.zeros_like(logits)
  _, (iterates, totals) = jax.lax.scan(step, (logits, zeros), None, length=steps)
  counts = jnp.arange(1, steps + 1, dtype=logits.dtype)[:, None]
  return totals / counts, iterates


def self_play(preference, *, eta: float, steps: int, logits=None) -> tuple[jax.Array, jax.Array]:
  """Eq. (5): (averages π̄_1..π̄_steps, iterates π_0..π_{steps−1}), probabilities [steps, n].

  Row t of the first is (1/(t+1)) Σ_{s≤t} π_s. logits of π_0 default to uniform; eta = η > 0.
  """
  p = games.check_preference(preference)
  n = p.shape[0]
  eta = games._positive("eta", eta)
  steps = games._count("steps", steps, 1)
  logits = jnp.zeros(n) if logits is None else games._vector("logits", logits, n)
  return _self_play(jax.nn.log_softmax(logits), p, eta, steps)
