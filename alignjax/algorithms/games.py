"""Tabular preference games: checks, equilibria and the reward-model (RLHF) baseline.

A preference game over n responses y ∈ {0, ..., n − 1} is a matrix P[i, j] = P(i ≻ j) with

  (1)  0 ≤ P ≤ 1,  P + Pᵀ = 1  (so P_ii = ½),

i.e. A = P − ½ is antisymmetric: the symmetric two-player zero-sum game with payoff A has value 0.
For policies π, π' (probability vectors over the n responses):

  (2)  P(y ≻ π) = (P π)_y,  P(π ≻ π') = πᵀ P π',  P(π ≻ π) = ½ (as πᵀ A π = 0),
  (3)  exploitability(π) = max_y P(y ≻ π) − ½ ≥ 0 (the maximum is at least the π-average, ½),

zero exactly at the game's Nash equilibria: the von Neumann / minimax winners that SPO (Swamy et
al. 2024) targets, the Nash equilibrium of the preference model of Nash-MD (Munos et al. 2023).

The regularised game of Munos et al. 2023 with reference policy μ and τ > 0,

  (4)  P_τ(π ≻ π') = P(π ≻ π') − τ KL(π ‖ μ) + τ KL(π' ‖ μ),

has a unique Nash equilibrium π*_τ, the solution of the first-order condition of
max_π P(π ≻ π*_τ) − τ KL(π ‖ μ):

  (5)  π*_τ(y) ∝ μ(y) exp(P(y ≻ π*_τ) / τ).

`regularized_nash` solves (5) by the damped fixed-point iteration

  (6)  π ← (1 − α) π + α F(π),  F(π) = softmax(log μ + P π / τ),  α = 1 / (1 + L²),  L = n / (4τ),

until max_y |π − F(π)| ≤ tol (default 1e-6: float32 rounds logits P π / τ of size ~10 at
~1e-6) or max_iterations. Why this α: along the simplex (directions δ with Σ δ = 0, where
P δ = A δ) the Jacobian of F is S A / τ with S = diag(F) − F Fᵀ ⪰ 0, ‖S‖ ≤ ½ and ‖A‖ ≤ n / 2.
S A is similar to the antisymmetric S^½ A S^½, so its eigenvalues are iλ with |λ| ≤ L, and the
damped map's eigenvalues 1 − α + iαλ have modulus² ≤ 1 − 2α + α²(1 + L²) = 1 − α < 1.

The geometric mixture of a policy with the reference (Munos et al. 2023, §5):

  (7)  π^β(y) ∝ π(y)^(1−β) μ(y)^β,  β ∈ [0, 1].

The RLHF baseline: a Bradley–Terry reward fitted to P by maximum likelihood over all pairs, then
KL-regularised RL against μ (whose solution is a Gibbs policy):

  (8)  r = argmax_r Σ_{i≠j} P_ij log σ(r_i − r_j),  Σ_i r_i = 0,
  (9)  π_RLHF(y) ∝ μ(y) exp(r_y / τ).

(8) is concave; `bradley_terry_fit` runs gradient ascent with step 1 / Lip = 4 / n (the negative
Hessian is Σ_{i<j} σ'(r_i − r_j)(e_i − e_j)(e_i − e_j)ᵀ ⪯ ¼ (n I − 1 1ᵀ)). The maximiser is finite
unless some set of responses beats all the others with probability exactly 1.

Preferences of a population of voters, each with a strict ranking (best first):

  (10) P_ij = fraction of voters who rank i above j,  P_ii = ½.

Policies are given as logits (any unnormalised log-probabilities) or, for (2)-(3), as
probabilities; results are normalised log-probabilities. Math is float32. Coefficients are static
Python numbers; the checks of P in (1) run when P is a concrete array (not under jit tracing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "bradley_terry_fit",
    "check_preference",
    "exploitability",
    "geometric_mixture",
    "preference_from_rankings",
    "regularized_nash",
    "rlhf_policy",
    "win_rate",
]

ATOL = 1e-6  # tolerance of the checks of (1)


# --------------------------------------------------------------------------- checks


def _concrete(x) -> np.ndarray | None:
  """x as a numpy array, or None when it is a tracer (values unknown at trace time)."""
  try:
    return np.asarray(x, np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_preference(preference) -> jax.Array:
  """Eq. (1): P as float32 [n, n], after checking its shape and (when concrete) its values."""
  p = jnp.asarray(preference, jnp.float32)
  if p.ndim != 2 or p.shape[0] != p.shape[1] or p.shape[0] < 1:
    raise ValueError(f"preference: shape {p.shape} must be square [n, n] with n >= 1")
  values = _concrete(preference)
  if values is not None:
    if not np.all((values >= -ATOL) & (values <= 1 + ATOL)):  # NaN fails too
      raise ValueError(
          f"preference: entries must lie in [0, 1]; got {values.min()}..{values.max()}"
      )
    gap = float(np.max(np.abs(values + values.T - 1.0)))
    if not gap <= ATOL:
      raise ValueError(
          f"preference: not antisymmetric, max |P + Pᵀ − 1| = {gap:.3g} > {ATOL} "
          "(P(i ≻ j) + P(j ≻ i) must be 1, and P(i ≻ i) = ½)"
      )
  return p


def _vector(name: str, x, n: int) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.shape != (n,):
    raise ValueError(f"{name}: shape {x.shape} must be [{n}] (one entry per response)")
  return x


def _policy(name: str, probs, n: int) -> jax.Array:
  probs = _vector(name, probs, n)
  values = _concrete(probs)
  if values is not None and not (np.all(values >= -ATOL) and abs(values.sum() - 1) <= 1e-4):
    raise ValueError(f"{name}: must be a probability vector (>= 0, sums to 1); got {values}")
  return probs


def _positive(name: str, value) -> float:
  value = float(value)
  if not value > 0:  # NaN fails too
    raise ValueError(f"{name}={value!r}: must be > 0")
  return value


def _unit(name: str, value) -> float:
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name}={value!r}: must lie in [0, 1]")
  return value


def _count(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r}: must be an int >= {minimum}")
  return int(value)


# --------------------------------------------------------------------------- game quantities


def win_rate(preference, probs) -> jax.Array:
  """Eq. (2): P(y ≻ π) for every response y, [n]."""
  p = check_preference(preference)
  return p @ _policy("probs", probs, p.shape[0])


def exploitability(preference, probs) -> jax.Array:
  """Eq. (3): max_y P(y ≻ π) − ½, a scalar ≥ 0 (0 at a Nash equilibrium)."""
  return jnp.max(win_rate(preference, probs)) - 0.5


def geometric_mixture(logits, ref_logits, *, beta: float) -> jax.Array:
  """Eq. (7): log π^β for logits of π and μ (any shape, mixed along the last axis)."""
  beta = _unit("beta", beta)
  logits = jnp.asarray(logits, jnp.float32)
  ref_logits = jnp.asarray(ref_logits, jnp.float32)
  if logits.shape != ref_logits.shape:
    raise ValueError(f"ref_logits: shape {ref_logits.shape} does not match logits {logits.shape}")
  return _mixture(logits, ref_logits, beta)


def _mixture(logits, ref_logits, beta):
  mixed = (1.0 - beta) * jax.nn.log_softmax(logits) + beta * jax.nn.log_softmax(ref_logits)
  return jax.nn.log_softmax(mixed)


def preference_from_rankings(rankings, num_responses: int | None = None) -> np.ndarray:
  """Eq. (10): P [n, n] (float64 numpy) from one strict ranking per voter, best first."""
  rankings = [list(map(int, r)) for r in rankings]
  if not rankings:
    raise ValueError("rankings: need at least one voter")
  n = len(rankings[0]) if num_responses is None else _count("num_responses", num_responses, 1)
  wins = np.zeros((n, n))
  for v, ranking in enumerate(rankings):
    if sorted(ranking) != list(range(n)):
      raise ValueError(f"rankings[{v}]={ranking}: must be a permutation of range({n})")
    for a, i in enumerate(ranking):
      wins[i, ranking[a + 1 :]] += 1.0
  p = wins / len(rankings)
  np.fill_diagonal(p, 0.5)
  return p


# --------------------------------------------------------------------------- solvers


@functools.partial(jax.jit, static_argnames=("tau", "tol", "max_iterations"))
def _regularized_nash(p, log_mu, tau, tol, max_iterations):
  n = p.shape[0]
  alpha = 1.0 / (1.0 + (n / (4.0 * tau)) ** 2)  # eq. (6)

  def fixed_map(pi):
    return jax.nn.softmax(log_mu + p @ pi / tau)

  def cond(state):
    _, residual, i = state
    return (residual > tol) & (i < max_iterations)

  def body(state):
    pi, _, i = state
    pi = (1.0 - alpha) * pi + alpha * fixed_map(pi)
    return pi, jnp.max(jnp.abs(pi - fixed_map(pi))), i + 1

  pi0 = jax.nn.softmax(log_mu)
  pi, residual, _ = jax.lax.while_loop(cond, body, (pi0, jnp.inf, 0))
  return jnp.log(fixed_map(pi)), residual


def regularized_nash(
    preference, ref_logits, *, tau: float, tol: float = 1e-6, max_iterations: int = 200_000
) -> tuple[jax.Array, jax.Array]:
  """Eqs. (5)-(6): (log π*_τ [n], final residual max |π − F(π)|)."""
  p = check_preference(preference)
  log_mu = jax.nn.log_softmax(_vector("ref_logits", ref_logits, p.shape[0]))
  tau = _positive("tau", tau)
  tol = _positive("tol", tol)
  max_iterations = _count("max_iterations", max_iterations, 1)
  return _regularized_nash(p, log_mu, tau, tol, max_iterations)


@functools.partial(jax.jit, static_argnames="iterations")
def _bradley_terry_fit(p, iterations):
  n = p.shape[0]
  off_diagonal = 1.0 - jnp.eye(n)

  def log_likelihood(r):  # eq. (8)
    return jnp.sum(off_diagonal * p * jax.nn.log_sigmoid(r[:, None] - r[None, :]))

  def step(_, r):
    r = r + (4.0 / n) * jax.grad(log_likelihood)(r)
    return r - jnp.mean(r)

  return jax.lax.fori_loop(0, iterations, step, jnp.zeros(n, p.dtype))


def bradley_terry_fit(preference, *, iterations: int = 20_000) -> jax.Array:
  """Eq. (8): the maximum-likelihood Bradley–Terry rewards r [n], centred."""
  p = check_preference(preference)
  return _bradley_terry_fit(p, _count("iterations", iterations, 1))


def rlhf_policy(rewards, ref_logits, *, tau: float) -> jax.Array:
  """Eq. (9): log π_RLHF ∝ log μ + r / τ, [n]."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f"rewards: shape {rewards.shape} must be [n]")
  ref_logits = _vector("ref_logits", ref_logits, rewards.shape[0])
  tau = _positive("tau", tau)
  return jax.nn.log_softmax(jax.nn.log_softmax(ref_logits) + rewards / tau)
