"""Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback"): the LM loss and the tabular
mirror-descent update.

LM loss (Nash-MD-PG, the paper's policy-gradient version, §7 as I read it). For B prompts, y_b ~
π_θ(·|x_b) is a response of the current policy with completion mask m [B, T] and per-token
log-probs log π_bt (as in `policy_gradient`), y'_b an opponent drawn from the geometric mixture
π^β ∝ π_θ^(1−β) π_ref^β (sampled by the caller, e.g. token by token from `mixture_logits`), and
P_b = P(y_b ≻ y'_b | x_b) ∈ [0, 1] from a judge (a 0/1 judgement works too). The objective, with
the opponent's law held fixed at its current value, is

  (1)  J(θ) = E_{y~π_θ}[P(y ≻ π^β)] − τ KL(π_θ ‖ π_ref).

With the per-token log-ratio ℓ_bt = log π_bt − log π_ref,bt and g_b = Σ_t m_bt ℓ_bt:

  (2)  "sequence":  A_b = P_b − ½ − τ g_b,     L = −(1/B) Σ_b A_b Σ_t m_bt log π_bt,
  (3)  "causal":    A_bt = P_b − ½ − τ Σ_{s≥t} m_bs ℓ_bs,
                    L = −(1/B) Σ_b Σ_t m_bt A_bt log π_bt,

the advantages constants (gradients stopped). Both are unbiased, E[∇L] = −∇J:

  (4)  ∇ E_{y~π_θ}[P(y ≻ π^β)] = E_{y~π_θ, y'~π^β}[(P(y ≻ y') − ½) ∇ log π_θ(y)]: the score
       function, y' independent of y with its law frozen; the baseline ½ is free because
       E[∇ log π_θ(y)] = 0, and a label I ~ Bernoulli(P) has E[I] = P.
  (5)  ∇ KL(π_θ ‖ π_ref) = ∇ Σ_y π_θ(y) g(y) = E[g(y) ∇ log π_θ(y)] + E[∇ g(y)], and
       E[∇ g(y)] = E[∇ log π_θ(y)] = 0 (π_ref is constant): the sequence log-ratio as a
       stop-gradient penalty, (2).
  (6)  Causality: ∇ log π_θ(y) = Σ_t m_t ∇ log π_t, and for s < t,
       E[ℓ_s ∇ log π_t] = E[ℓ_s E[∇ log π_t | y_<t]] = 0 (ℓ_s is fixed by the prefix and the
       conditional score has mean 0). Dropping those terms from (2) gives (3), with the same mean
       and without the noise they add (the reward-to-go of the penalty).
  (7)  Not unbiased: a k3 penalty τ Σ_t m_t k3_t added to the loss and differentiated per token
       has the gradient of a per-step reverse KL (`policy_gradient` eq. 12), not of (1).

The opponent: `mixture_logits` is the per-token geometric mixture
π^β(v | h) ∝ π_θ(v | h)^(1−β) π_ref(v | h)^β that a sampler can draw from. For responses of more
than one token it differs from the sequence-level mixture ∝ π_θ(y)^(1−β) π_ref(y)^β (the
per-token normalisers depend on the prefix); (4) holds for any opponent law independent of θ.

Tabular Nash-MD (the paper's §5). With games.py's notation (P an n × n preference matrix,
P(y ≻ π) = (P π)_y, reference μ) and a step η > 0 with ητ ≤ 1, one step from π_t is

  (8)  π_t^μ(y) ∝ π_t(y)^(1−ητ) μ(y)^ητ                    (the regularised policy),
  (9)  π_{t+1} = argmax_π η P(π ≻ π_t^μ) − KL(π ‖ π_t^μ),   i.e.
       π_{t+1}(y) ∝ π_t^μ(y) exp(η P(y ≻ π_t^μ)).

`nash_md_step` takes the mixture exponent β = ητ by default; an explicit β ∈ [0, 1] decouples
the two (the form Nash-MD-PG uses). The paper's convergence theorem (Theorem 1 as I read it): with
π*_τ the Nash equilibrium of the regularised game (games.py eq. 5),

  (10) KL(π*_τ ‖ π_{t+1}) ≤ (1 − η_t τ) KL(π*_τ ‖ π_t) + 2 η_t²,  so with η_t = 2 / (τ (t + 2))
       (η_0 τ = 1: π_0^μ = μ whatever π_0)  KL(π*_τ ‖ π_T) ≤ 8 / (τ² (T + 1)) for T ≥ 1
       (by induction: t/((t + 1)(t + 2)) + 1/(t + 2)² ≤ 1/(t + 2)).

`nash_md` runs (8)-(9) for a number of steps, with that schedule or a constant η, in one scan.
Math is float32; coefficients are static Python numbers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from alignjax.algorithms import games
from alignjax.algorithms import policy_gradient as pg

__all__ = ["KL_ESTIMATORS", "mixture_logits", "nash_md", "nash_md_loss", "nash_md_step"]

KL_ESTIMATORS = ("sequence", "causal")


# --------------------------------------------------------------------------- LM loss


def mixture_logits(policy_logits: jax.Array, ref_logits: jax.Array, *, beta: float) -> jax.Array:
  """Per-token log π^β [..., V] ∝ (1 − β) log π_θ + β log π_ref, to sample the opponent y'."""
  return games.geometric_mixture(policy_logits, ref_logits, beta=beta)


def _causal_sum(x: jax.Array) -> jax.Array:
  """Σ_{s≥t} x_s along the last axis (reward-to-go)."""
  return jnp.flip(jnp.cumsum(jnp.flip(x, axis=-1), axis=-1), axis=-1)


def nash_md_loss(
    policy_logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    win_prob: jax.Array,
    *,
    tau: float,
    kl_estimator: str = "causal",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eqs. (2)-(3): (loss, {win_mean, kl_mean, advantage_mean}).

  Log-probs and mask [B, T]; win_prob [B] = P(y_b ≻ y'_b) in [0, 1]; tau = τ > 0 and
  kl_estimator in KL_ESTIMATORS are static. kl_mean is the batch mean of g_b, an unbiased
  estimate of KL(π_θ ‖ π_ref); advantage_mean the mean of A_b (of A_b at the first token, for
  "causal": both equal P_b − ½ − τ g_b there).
  """
  _, m, x = pg._tokens(mask, policy_logp=policy_logp, ref_logp=ref_logp)
  win_prob = pg._per_sequence("win_prob", win_prob, m.shape[0])
  values = games._concrete(win_prob)
  if values is not None and not ((values >= 0) & (values <= 1)).all():
    raise ValueError(f"win_prob: must lie in [0, 1]; got {values.min()}..{values.max()}")
  tau = pg._coefficient("tau", tau, strict=True)
  if kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_estimator={kl_estimator!r}: valid choices are {KL_ESTIMATORS}")
  policy = x["policy_logp"]
  log_ratio = jax.lax.stop_gradient((policy - x["ref_logp"]) * m)  # m_bt ℓ_bt
  g = jnp.sum(log_ratio, axis=1)
  win = jax.lax.stop_gradient(win_prob) - 0.5
  if kl_estimator == "sequence":
    advantage = jnp.broadcast_to((win - tau * g)[:, None], m.shape)  # eq. (2)
  else:
    advantage = win[:, None] - tau * _causal_sum(log_ratio)  # eq. (3)
  loss = -jnp.mean(jnp.sum(advantage * policy * m, axis=1))
  metrics = {
      "win_mean": jnp.mean(win_prob),
      "kl_mean": jnp.mean(g),
      "advantage_mean": jnp.mean(win - tau * g),
  }
  return loss, metrics


# --------------------------------------------------------------------------- tabular


def _nash_md_step(logits, p, log_mu, eta, beta):
  mixed = games._mixture(logits, log_mu, beta)  # eq. (8)
  return jax.nn.log_softmax(mixed + eta * (p @ jnp.exp(mixed)))  # eq. (9)


def _mixing(eta: float, tau: float, beta: float | None) -> float:
  if beta is None:
    beta = eta * tau
    if beta > 1.0:
      raise ValueError(f"eta * tau = {beta!r}: must be <= 1 (the exponent of μ in eq. 8)")
  return games._unit("beta", beta)


@functools.partial(jax.jit, static_argnames=("eta", "beta"))
def _step_jit(logits, p, log_mu, eta, beta):
  return _nash_md_step(logits, p, log_mu, eta, beta)


def nash_md_step(
    logits, preference, ref_logits, *, eta: float, tau: float, beta: float | None = None
) -> jax.Array:
  """Eqs. (8)-(9): log π_{t+1} [n] from logits of π_t [n], P [n, n] and logits of μ [n].

  β defaults to ητ (Nash-MD); eta = η > 0 and tau = τ > 0 are static.
  """
  p = games.check_preference(preference)
  n = p.shape[0]
  logits = games._vector("logits", logits, n)
  log_mu = jax.nn.log_softmax(games._vector("ref_logits", ref_logits, n))
  eta, tau = games._positive("eta", eta), games._positive("tau", tau)
  return _step_jit(logits, p, log_mu, eta, _mixing(eta, tau, beta))


@functools.partial(jax.jit, static_argnames=("tau", "steps", "eta"))
def _nash_md(logits, p, log_mu, tau, steps, eta):
  def step(logits, t):
    eta_t = 2.0 / (tau * (t + 2.0)) if eta is None else eta  # eq. (10)
    logits = _nash_md_step(logits, p, log_mu, eta_t, eta_t * tau)
    return logits, logits

  _, trajectory = jax.lax.scan(step, logits, jnp.arange(steps, dtype=jnp.float32))
  return jnp.concatenate([logits[None], trajectory])


def nash_md(
    preference,
    ref_logits,
    *,
    tau: float,
    steps: int,
    eta: float | None = None,
    logits=None,
) -> jax.Array:
  """Runs (8)-(9): log π_t for t = 0..steps, [steps + 1, n].

  eta=None uses η_t = 2 / (τ (t + 2)) (eq. 10); a constant eta needs ητ <= 1. logits (of π_0)
  default to μ's.
  """
  p = games.check_preference(preference)
  n = p.shape[0]
  log_mu = jax.nn.log_softmax(games._vector("ref_logits", ref_logits, n))
  tau = games._positive("tau", tau)
  steps = games._count("steps", steps, 1)
  if eta is not None:
    eta = games._positive("eta", eta)
    _mixing(eta, tau, None)
  logits = log_mu if logits is None else jax.nn.log_softmax(games._vector("logits", logits, n))
  return _nash_md(logits, p, log_mu, tau, steps, eta)
