"""Online policy-gradient losses for language models: GRPO, RLOO / REINFORCE and online IPO.

Every function takes per-token log-probabilities [B, T] of sampled responses (`alignjax.lm.scoring`
eq. 1, or the sampler's `model_log_probs`) and a completion mask m [B, T] (nonzero on the
response tokens that count, zero on prompt and padding; log-probs under a zero mask are ignored,
even NaN). A batch holds B = num_prompts × k responses, the k responses of one prompt
contiguous: rows g k, ..., g k + k − 1 form group g. Below, log π_bt = log π_θ(y_bt | x_b, y_b,<t),
n_b = Σ_t m_bt is the length of response b and log π(y_b) = Σ_t m_bt log π_bt its log-probability.

Advantages from one reward per response, r [B], within each group of k:

  (1)  GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
       Open Language Models"):  A_i = (r_i − mean_g r) / (std_g r + eps), std with ddof 0;
       normalize_std=False gives the mean-centring of Dr. GRPO (Liu et al. 2025, "Understanding
       R1-Zero-Like Training: A Critical Perspective"):  A_i = r_i − mean_g r.
  (2)  RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
       Learning from Human Feedback in LLMs"):  A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j
       = k/(k−1) · (r_i − mean_g r).

Per-token terms, with π_old the policy that sampled the batch and π_ref the frozen reference:

  (3)  ρ_bt = exp(log π_bt − log π_old,bt),
  (4)  k3_bt = exp(δ_bt) − δ_bt − 1 ≥ 0,  δ_bt = log π_ref,bt − log π_bt  (Schulman 2020,
       "Approximating KL Divergence"; computed as expm1(δ) − δ),
  (5)  s_bt = min(ρ_bt A_b, clip(ρ_bt, 1 − ε, 1 + ε) A_b) − β k3_bt.

Losses (to minimise):

  (6)  GRPO:  L = −(1/B) Σ_b (1/n_b) Σ_t m_bt s_bt        length_norm="sequence" (GRPO's),
                  −Σ_bt m_bt s_bt / Σ_bt m_bt             "token",
                  −(1/(B T)) Σ_bt m_bt s_bt               "constant" (Dr. GRPO; T the padded
                                                          length, fixed by the batch shape);
       n_b and the token count are floored at 1, so an empty row contributes 0.
  (7)  REINFORCE / RLOO:  L = −(1/B) Σ_b A_b log π(y_b).
  (8)  Online IPO (Calandriello et al. 2024, "Human Alignment of Large Language Models through
       Online Preference Optimisation"): rows (2i, 2i + 1) are two responses y, y' to one prompt,
       both sampled from the current policy, and P_i = P(y ≻ y') their judged win probability:
         g(y) = Σ_t m_t (log π_t − log π_ref,t),   h_i = g(y_2i) − g(y_2i+1),
         L = (1/N) Σ_i (h_i − (P_i − ½)/τ)²,   N = B/2 pairs.
       Convention: P − ½ (not P) makes the target antisymmetric like h (swapping y and y' maps
       P to 1 − P and h to −h, leaving L unchanged). Because h is a difference g(y) − g(y'),
       (8) differs by a θ-independent constant from IPO's form E[(h − (P(y ≻ μ) − P(y' ≻ μ))/τ)²]
       (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
       Preferences") with μ the sampling policy, and from the same loss with a sampled label
       I ~ Bernoulli(P) in place of P (E[I − ½] = P − ½), so win_prob may be a 0/1 judgement.
  (9)  Diagnostics of (6): clipfrac = token mean of [|ρ − 1| > ε], kl_mean = token mean of k3,
       ratio_min / ratio_max over the counted tokens.

The sampling ratio's reference π_old, π_ref, the advantages and P are constants: their gradients
are stopped inside. All coefficients are static Python numbers; all math is float32.

Exact facts (expectations over responses drawn iid from π_θ, at π_old = π_θ; the tests check each
by enumerating every response of a small autoregressive model):

  (10) RLOO is unbiased: E[∇ (7) with (2)] = −∇J, J(θ) = E_{y~π_θ}[r(y)]. Mean-centring with
       the group's own mean (1, normalize_std=False) is exactly (k−1)/k times (2) sample by
       sample, so E[∇] = −((k−1)/k) ∇J.
  (11) GRPO (6) at ρ = 1 with β = 0 and "constant": E[∇] = (1/T) times (10) for the same
       advantages; "sequence" and "token" match it only when every response has T tokens. With
       uneven lengths their normaliser depends on the sample and the estimate is biased (the
       length bias Liu et al. 2025 describe).
  (12) k3 is unbiased in value and not in gradient. E[Σ_t m_t k3_t] = KL(π_θ ‖ π_ref) of whole
       responses (chain rule; E_{y_t~π_θ}[k3_t] is the per-step KL). But differentiating (4)
       through log π_θ with the samples fixed gives
         E[Σ_t m_t ∇ k3_t] = E_{y~π_θ}[Σ_t m_t ∇_θ KL(π_ref(·|h_t) ‖ π_θ(·|h_t))],
       the per-step *reverse* KL at the prefixes h_t = (x, y_<t) the policy visits, with their
       distribution held fixed: ∇ KL(π_ref ‖ π_θ) for one-token responses, and in general neither
       ∇ KL(π_θ ‖ π_ref) nor ∇ KL(π_ref ‖ π_θ) (Tang & Munos 2025, "On a few pitfalls in KL
       divergence gradient estimation for RL"). The gradient of KL(π_θ ‖ π_ref) itself is the
       score-function one: (7) with A = −g(y) (the KL as a reward penalty) has E[∇] =
       ∇ KL(π_θ ‖ π_ref).
  (13) Online IPO is self-play on the KL-regularised preference game: with P(y ≻ π) =
       E_{y'~π}[P(y ≻ y')],
         E_{y,y'~π_θ}[∇ (8)] = −(4/τ) ∇_θ' [E_{y~π_θ'} P(y ≻ π_θ) − τ KL(π_θ' ‖ π_ref)] at θ' = θ,
       the opponent π_θ frozen: the sense in which Calandriello et al. 2024 relate online IPO to
       Nash-MD.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

__all__ = [
    "LENGTH_NORMS",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "online_ipo_loss",
    "reinforce_loss",
    "rloo_advantages",
]

LENGTH_NORMS = ("sequence", "token", "constant")


# --------------------------------------------------------------------------- checks


def _group_size(group_size, minimum: int) -> int:
  try:
    k = operator.index(group_size)
  except TypeError:
    k = None
  if k is None or isinstance(group_size, bool) or k < minimum:
    raise ValueError(f"group_size={group_size!r}: must be an int >= {minimum}")
  return k


def _grouped(rewards, group_size, minimum: int) -> jax.Array:
  """rewards [B] as float32 [B / k, k]."""
  rewards = jnp.asarray(rewards, jnp.float32)
  k = _group_size(group_size, minimum)
  if rewards.ndim != 1:
    raise ValueError(f"rewards: shape {rewards.shape} must be [batch]")
  if rewards.shape[0] % k:
    raise ValueError(
        f"group_size={k}: rewards has {rewards.shape[0]} rows, not a whole number of groups"
    )
  return rewards.reshape(-1, k)


def _coefficient(name: str, value, *, strict: bool = False) -> float:
  value = float(value)
  if not (value > 0 if strict else value >= 0):  # NaN fails too
    raise ValueError(f"{name}={value!r}: must be {'> 0' if strict else '>= 0'}")
  return value


def _tokens(mask, **arrays) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(valid bool [B, T], m float32 [B, T], arrays as float32 with 0 where not valid)."""
  mask = jnp.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask: shape {mask.shape} must be [batch, length]")
  out = {}
  for name, x in arrays.items():
    x = jnp.asarray(x, jnp.float32)
    if x.shape != mask.shape:
      raise ValueError(f"{name}: shape {x.shape} does not match mask {mask.shape}")
    out[name] = x
  valid = mask != 0
  out = {name: jnp.where(valid, x, 0.0) for name, x in out.items()}  # masked slots never count
  return valid, valid.astype(jnp.float32), out


def _per_sequence(name: str, x, batch: int) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.shape != (batch,):
    raise ValueError(f"{name}: shape {x.shape} must be [{batch}] (one per row)")
  return x


# --------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: jax.Array, group_size: int, *, normalize_std: bool = True, eps: float = 1e-4
) -> jax.Array:
  """Eq. (1): rewards [B] -> advantages [B], centred (and scaled) within each group."""
  groups = _grouped(rewards, group_size, 1)
  eps = _coefficient("eps", eps)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if normalize_std:
    centred = centred / (jnp.std(groups, axis=1, keepdims=True) + eps)
  return centred.reshape(-1)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
  """Eq. (2): each reward minus the mean of the other k − 1 rewards of its group."""
  groups = _grouped(rewards, group_size, 2)
  k = groups.shape[1]
  leave_one_out = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (k - 1)
  return (groups - leave_one_out).reshape(-1)


# --------------------------------------------------------------------------- per-token terms


def _k3(policy_logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  delta = jax.lax.stop_gradient(ref_logp) - policy_logp
  return jnp.maximum(jnp.expm1(delta) - delta, 0.0)  # eq. (4); the floor only absorbs rounding


def k3_kl(policy_logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Eq. (4) per token, ≥ 0 (any equal shapes; gradient through policy_logp only)."""
  policy_logp = jnp.asarray(policy_logp, jnp.float32)
  ref_logp = jnp.asarray(ref_logp, jnp.float32)
  if policy_logp.shape != ref_logp.shape:
    raise ValueError(
        f"ref_logp: shape {ref_logp.shape} does not match policy_logp {policy_logp.shape}"
    )
  return _k3(policy_logp, ref_logp)


def _reduce(x: jax.Array, m: jax.Array, length_norm: str) -> jax.Array:
  """The three normalisations of eq. (6) for per-token x [B, T], zero where m is 0."""
  total = jnp.sum(x * m, axis=1)
  if length_norm == "sequence":
    return jnp.mean(total / jnp.maximum(jnp.sum(m, axis=1), 1.0))
  if length_norm == "token":
    return jnp.sum(total) / jnp.maximum(jnp.sum(m), 1.0)
  return jnp.sum(total) / m.size


# --------------------------------------------------------------------------- losses


def grpo_loss(
    policy_logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    length_norm: str = "sequence",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eqs. (3)-(6), (9): (loss, {clipfrac, kl_mean, ratio_min, ratio_max}).

  Log-probs and mask [B, T], advantages [B]. clip_eps = ε > 0 and kl_coef = β ≥ 0 are static.
  """
  valid, m, x = _tokens(mask, policy_logp=policy_logp, old_logp=old_logp, ref_logp=ref_logp)
  adv = jax.lax.stop_gradient(_per_sequence("advantages", advantages, m.shape[0]))[:, None]
  clip_eps = _coefficient("clip_eps", clip_eps, strict=True)
  kl_coef = _coefficient("kl_coef", kl_coef)
  if length_norm not in LENGTH_NORMS:
    raise ValueError(f"length_norm={length_norm!r}: valid choices are {LENGTH_NORMS}")
  policy = x["policy_logp"]
  ratio = jnp.exp(policy - jax.lax.stop_gradient(x["old_logp"]))  # eq. (3)
  kl = _k3(policy, x["ref_logp"])  # eq. (4)
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate = jnp.minimum(ratio * adv, clipped * adv) - kl_coef * kl  # eq. (5)
  loss = -_reduce(surrogate, m, length_norm)  # eq. (6)
  ratio, kl = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(kl)
  tokens = jnp.maximum(jnp.sum(m), 1.0)
  metrics = {  # eq. (9)
      "clipfrac": jnp.sum(m * (jnp.abs(ratio - 1.0) > clip_eps)) / tokens,
      "kl_mean": jnp.sum(m * kl) / tokens,
      "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
      "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
  }
  return loss, metrics


def reinforce_loss(policy_logp: jax.Array, advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """Eq. (7): −mean_b A_b Σ_t m_bt log π_bt (log-probs and mask [B, T], advantages [B])."""
  _, m, x = _tokens(mask, policy_logp=policy_logp)
  adv = jax.lax.stop_gradient(_per_sequence("advantages", advantages, m.shape[0]))
  return -jnp.mean(adv * jnp.sum(x["policy_logp"] * m, axis=1))


def online_ipo_loss(
    policy_logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    win_prob: jax.Array,
    *,
    tau: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. (8): (loss, {margin_mean, target_mean, agreement}).

  Log-probs and mask [B, T] with B = 2N, rows (2i, 2i + 1) the pair (y, y') of one prompt;
  win_prob [N] = P(y ≻ y') in [0, 1] (a 0/1 judgement works too); tau = τ > 0 is static.
  agreement: the fraction of pairs whose margin h has the sign of P − ½.
  """
  _, m, x = _tokens(mask, policy_logp=policy_logp, ref_logp=ref_logp)
  if m.shape[0] % 2:
    raise ValueError(f"policy_logp: {m.shape[0]} rows, not a whole number of (y, y') pairs")
  win_prob = jax.lax.stop_gradient(_per_sequence("win_prob", win_prob, m.shape[0] // 2))
  tau = _coefficient("tau", tau, strict=True)
  log_ratio = jnp.sum((x["policy_logp"] - jax.lax.stop_gradient(x["ref_logp"])) * m, axis=1)
  pairs = log_ratio.reshape(-1, 2)
  margin = pairs[:, 0] - pairs[:, 1]  # h_i
  target = (win_prob - 0.5) / tau
  loss = jnp.mean(jnp.square(margin - target))  # eq. (8)
  margin = jax.lax.stop_gradient(margin)
  metrics = {
      "margin_mean": jnp.mean(margin),
      "target_mean": jnp.mean(target),
      "agreement": jnp.mean((margin * (win_prob - 0.5) > 0).astype(jnp.float32)),
  }
  return loss, metrics
