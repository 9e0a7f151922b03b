"""Offline preference losses over per-sequence log-probs: DPO (Rafailov, Sharma, Mitchell,
Ermon, Manning, Finn 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model"), IPO (Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos 2023, "A General
Theoretical Paradigm to Understand Learning from Human Preferences") and SPPO (Wu, Sun, Yuan,
Ji, Yang, Gu 2024, "Self-Play Preference Optimization for Language Model Alignment").

Inputs are log-probabilities of whole completions, summed over their tokens (`sums` of
`alignjax.lm.scoring.score`), under the trained policy π_θ and a frozen reference π_ref, for a
batch of B prompts: arrays of shape [B]. For a chosen completion y_c preferred to a rejected
y_r, the log-ratio margin is

  (1)  h = (log π_θ(y_c) − log π_θ(y_r)) − (log π_ref(y_c) − log π_ref(y_r)).

DPO, with the conservative label smoothing ε of cDPO (the label flipped with probability ε;
ε = 0 is plain DPO), σ the logistic function:

  (2)  ℓ_DPO = −(1 − ε) log σ(β h) − ε log σ(−β h).

Its diagnostics are the implicit rewards and how often the policy ranks the pair right:

  (3)  r̂_c = β (log π_θ(y_c) − log π_ref(y_c)),  r̂_r = β (log π_θ(y_r) − log π_ref(y_r)),
       margin = r̂_c − r̂_r = β h,  accuracy = [h > 0].

IPO regresses the margin onto a fixed target. alignjax follows the paper's convention (its
eq. 17, the empirical IPO loss): τ is the regularisation strength and the target is τ⁻¹/2,

  (4)  ℓ_IPO = (h − 1 / (2τ))²,

so a larger τ asks for a smaller margin (τ plays the role of β in the diagnostics (3)).

SPPO regresses the log-ratio of one completion y against the previous iterate π_t (the
reference here) onto its centred win-probability against π_t, P(y ≻ π_t) ∈ [0, 1], a soft
label (e.g. the mean preference of y over K samples of π_t):

  (5)  ℓ_SPPO = (log π_θ(y) − log π_t(y) − η (P(y ≻ π_t) − ½))².

This is the paper's regression towards the multiplicative-weights update
π_{t+1}(y) ∝ π_t(y) exp(η P(y ≻ π_t)) with the log-partition log Z_t replaced by η/2. For a
pair (y_c, y_r) with win-probabilities P_c and P_r (P_r = 1 − P_c when only the pair's own
preference probability is known), both completions are regressed, as in the SPPO code:

  (6)  ℓ_SPPO-pair = ½ [ℓ_SPPO(y_c; P_c) + ℓ_SPPO(y_r; P_r)].

Every loss is the weighted mean over the batch, with optional per-example weights w ≥ 0 (a 0/1
mask, or importance weights; w = 1 by default):

  (7)  L = Σ_b w_b ℓ_b / Σ_b w_b   (0 when all weights are 0).

RPO (Pang, Yuan, Cho, He, Sukhbaatar, Weston 2024, "Iterative Reasoning Preference
Optimization", eq. 1; TRL's `rpo_alpha`) adds the chosen completion's negative log-likelihood,
normalised by its length |y_c| in tokens, to DPO. Offline DPO can lower the likelihood of the
chosen and rejected completions alike and move the mass to completions neither contains
(likelihood displacement); the NLL term keeps the chosen likely:

  (8)  ℓ_RPO = ℓ_DPO − α log π_θ(y_c) / |y_c|,   α ≥ 0 (α = 0 is DPO).

Population minimisers (what `tests/algorithms/test_dpo.py` checks on a K-armed bandit with a
tabular softmax policy; g_i = log π_θ(i) − log π_ref(i)):

- DPO with Bradley–Terry preferences P(i ≻ j) = σ(r_i − r_j) over any connected pair design:
  σ(β h_ij) = P(i ≻ j) for every pair, i.e. π_θ ∝ π_ref exp(r / β).
- IPO: per pair h_ij = (P(i ≻ j) − ½) / τ, which a policy can meet only approximately (h_ij
  = g_i − g_j); the minimiser is the weighted least-squares fit, and for the uniform design
  over all pairs g_i = (1/τ)(1/K) Σ_j (P(i ≻ j) − ½) + c (with P(i ≻ i) = ½).
- SPPO: (5) pins the log-ratio itself, not up to a constant. A normalised policy reaches the
  target only when log Z_t = η/2 exactly; otherwise, with y ~ π_t, the minimiser satisfies
  g_y + κ exp(g_y) = η (P(y ≻ π_t) − ½) for one constant κ ≥ 0 fixed by Σ_y π_t(y) e^{g_y} = 1.
  It is close to the multiplicative-weights update (they differ at second order in η) and
  equals it when the target is ηP(y ≻ π_t) − log Z_t.

The losses take summed log-probs; length-normalised ones (per-token means, as some IPO and
SPPO setups use) can be passed instead. Math runs in float32 at least (bfloat16 and float16
inputs are upcast; float64 stays float64). All functions are pure and jittable; β, τ, η and ε
are checked when they are concrete numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dpo_loss", "ipo_loss", "rpo_loss", "sppo_loss", "sppo_pair_loss"]


# --------------------------------------------------------------------------- checks


def _check_positive(name: str, value) -> None:
  """β, τ, η: a scalar > 0 (checked only when concrete, so traced schedules pass)."""
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
  try:
    v = float(value)
  except TypeError:  # a tracer (jax.errors.ConcretizationTypeError is a TypeError)
    return
  if not (v > 0 and np.isfinite(v)):
    raise ValueError(f"{name}={value}: must be a finite number > 0")


def _as_arrays(fn: str, names: tuple[str, ...], values: tuple, weights) -> tuple:
  """The per-example inputs as float arrays (float32 at least) of one common shape [B]."""
  arrays = [jnp.asarray(v) for v in values]
  shape = arrays[0].shape
  if len(shape) != 1:
    raise ValueError(f"{fn}: {names[0]} has shape {shape}; per-sequence log-probs are [batch]")
  for name, a in zip(names[1:], arrays[1:]):
    if a.shape != shape:
      raise ValueError(f"{fn}: {name} has shape {a.shape}, {names[0]} has {shape}")
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != shape:
      raise ValueError(f"{fn}: weights has shape {weights.shape}, {names[0]} has {shape}")
    arrays.append(weights)
  dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
  arrays = [a.astype(dtype) for a in arrays]
  if weights is None:
    arrays.append(None)
  return tuple(arrays)


def _mean(x: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Eq. (7): the weighted batch mean (the plain mean without weights)."""
  if weights is None:
    return jnp.mean(x)
  total = jnp.sum(weights)
  return jnp.sum(weights * x) / jnp.maximum(total, jnp.finfo(x.dtype).tiny)


def _pair_metrics(log_ratio_c, log_ratio_r, scale, weights) -> dict[str, jax.Array]:
  """Eq. (3) with β = scale, batch means."""
  h = log_ratio_c - log_ratio_r  # eq. (1)
  return {
      "rewards_chosen": _mean(scale * log_ratio_c, weights),
      "rewards_rejected": _mean(scale * log_ratio_r, weights),
      "reward_margin": _mean(scale * h, weights),
      "accuracy": _mean((h > 0).astype(h.dtype), weights),
  }


_PAIR_NAMES = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")


# --------------------------------------------------------------------------- losses


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO, eqs. (1)-(3) and (7): (loss, metrics) from per-sequence log-probs [B].

  beta: the KL strength β > 0. label_smoothing: cDPO's ε in [0, ½) (at ½ the loss ignores the
  labels). weights: optional per-example weights or 0/1 mask [B]. Metrics (batch means):
  rewards_chosen, rewards_rejected, reward_margin, accuracy.
  """
  _check_positive("beta", beta)
  try:
    eps = float(label_smoothing)
  except TypeError:
    eps = None
  if eps is not None and not 0.0 <= eps < 0.5:
    raise ValueError(f"label_smoothing={label_smoothing}: must lie in [0, 0.5)")
  pc, pr, rc, rr, w = _as_arrays(
      "dpo_loss", _PAIR_NAMES, (policy_chosen, policy_rejected, ref_chosen, ref_rejected), weights
  )
  log_ratio_c, log_ratio_r = pc - rc, pr - rr
  h = log_ratio_c - log_ratio_r  # eq. (1)
  losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - (
      label_smoothing * jax.nn.log_sigmoid(-beta * h)
  )  # eq. (2)
  return _mean(losses, w), _pair_metrics(log_ratio_c, log_ratio_r, beta, w)


def rpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    chosen_lengths: jax.Array,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """RPO, eqs. (1)-(3), (7) and (8): DPO plus α times the chosen completions' per-token NLL.

  chosen_lengths: |y_c| in tokens [B] (> 0). alpha: the NLL weight α ≥ 0. Metrics: those of
  `dpo_loss` and nll_chosen (the batch mean of −log π_θ(y_c) / |y_c|).
  """
  try:
    a = float(alpha)
  except TypeError:
    a = None
  if a is not None and not (a >= 0 and np.isfinite(a)):
    raise ValueError(f"alpha={alpha}: must be a finite number >= 0")
  loss, metrics = dpo_loss(
      policy_chosen,
      policy_rejected,
      ref_chosen,
      ref_rejected,
      beta=beta,
      label_smoothing=label_smoothing,
      weights=weights,
  )
  pc, n, w = _as_arrays(
      "rpo_loss", ("policy_chosen", "chosen_lengths"), (policy_chosen, chosen_lengths), weights
  )
  nll = _mean(-pc / jnp.maximum(n, 1.0), w)  # eq. (8)
  return loss + alpha * nll, {**metrics, "nll_chosen": nll}


def ipo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    tau: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """IPO, eqs. (1), (4) and (7): (loss, metrics) from per-sequence log-probs [B].

  tau: the regularisation τ > 0 of the paper; the margin's target is 1/(2τ). Metrics as for
  `dpo_loss`, eq. (3) with β = τ.
  """
  _check_positive("tau", tau)
  pc, pr, rc, rr, w = _as_arrays(
      "ipo_loss", _PAIR_NAMES, (policy_chosen, policy_rejected, ref_chosen, ref_rejected), weights
  )
  log_ratio_c, log_ratio_r = pc - rc, pr - rr
  h = log_ratio_c - log_ratio_r  # eq. (1)
  losses = (h - 1.0 / (2.0 * tau)) ** 2  # eq. (4)
  return _mean(losses, w), _pair_metrics(log_ratio_c, log_ratio_r, tau, w)


def sppo_loss(
    policy_y: jax.Array,
    ref_y: jax.Array,
    win_prob: jax.Array,
    *,
    eta: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SPPO, eqs. (5) and (7): (loss, metrics) for single completions y [B].

  policy_y, ref_y: log π_θ(y) and log π_t(y) (π_t: the previous iterate); win_prob: the soft
  label P(y ≻ π_t) in [0, 1] (not checked). eta: the step size η > 0. Metrics (batch means):
  log_ratio (log π_θ(y) − log π_t(y)) and target (η (P − ½)).
  """
  _check_positive("eta", eta)
  p, r, q, w = _as_arrays(
      "sppo_loss", ("policy_y", "ref_y", "win_prob"), (policy_y, ref_y, win_prob), weights
  )
  log_ratio = p - r
  target = eta * (q - 0.5)
  losses = (log_ratio - target) ** 2  # eq. (5)
  return _mean(losses, w), {"log_ratio": _mean(log_ratio, w), "target": _mean(target, w)}


def sppo_pair_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    win_prob_chosen: jax.Array,
    win_prob_rejected: jax.Array | None = None,
    *,
    eta: float,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SPPO on pairs, eqs. (5)-(7): (loss, metrics) from per-sequence log-probs [B].

  win_prob_chosen, win_prob_rejected: P(y_c ≻ π_t) and P(y_r ≻ π_t); without the latter,
  win_prob_chosen is read as the pair's preference probability P(y_c ≻ y_r) and P_r = 1 − P_c.
  Metrics: those of `dpo_loss` (eq. (3) with β = 1/η: rewards are log-ratios / η).
  """
  _check_positive("eta", eta)
  names = _PAIR_NAMES + ("win_prob_chosen",)
  values = (policy_chosen, policy_rejected, ref_chosen, ref_rejected, win_prob_chosen)
  if win_prob_rejected is not None:
    names, values = names + ("win_prob_rejected",), values + (win_prob_rejected,)
  arrays = _as_arrays("sppo_pair_loss", names, values, weights)
  pc, pr, rc, rr, qc = arrays[:5]
  qr = 1.0 - qc if win_prob_rejected is None else arrays[5]
  w = arrays[-1]
  log_ratio_c, log_ratio_r = pc - rc, pr - rr
  losses = 0.5 * (
      (log_ratio_c - eta * (qc - 0.5)) ** 2 + (log_ratio_r - eta * (qr - 0.5)) ** 2
  )  # eqs. (5), (6)
  return _mean(losses, w), _pair_metrics(log_ratio_c, log_ratio_r, 1.0 / eta, w)
