"""policy_gradient: numpy re-implementations, and exact expectations by enumeration.

The enumeration model is a tabular autoregressive "LM": vocabulary V = 3, at most T = 3 tokens,
logits θ[t, previous token, v] (previous = BOS at t = 0). With `eos=True` token 0 ends a response
(later slots hold 0 and are masked), giving 15 responses of lengths 1-3; otherwise all 27
responses have length 3. Every expectation over k iid responses is a sum over all k-tuples
weighted by their exact probabilities, so the checks below hold to float32 rounding.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.algorithms import policy_gradient as pg

V, T, BOS, EOS = 3, 3, 3, 0
TOL = 1e-5

# ----------------------------------------------------------------------------- numpy references


def np_group_advantages(r, k, normalize_std, eps):
  out = np.empty_like(r)
  for start in range(0, len(r), k):
    x = r[start : start + k]
    out[start : start + k] = (x - x.mean()) / (x.std() + eps if normalize_std else 1.0)
  return out


def np_rloo(r, k):
  out = np.empty_like(r)
  for i in range(len(r)):
    start = i // k * k
    others = [r[j] for j in range(start, start + k) if j != i]
    out[i] = r[i] - sum(others) / (k - 1)
  return out


def np_k3(pol, ref):
  return np.exp(ref - pol) - (ref - pol) - 1.0


def np_grpo(pol, old, ref, adv, mask, eps, beta, norm):
  rows, tokens, per_row = [], [], []
  for b in range(pol.shape[0]):
    s = []
    for t in range(pol.shape[1]):
      if not mask[b, t]:
        continue
      rho = np.exp(pol[b, t] - old[b, t])
      surr = min(rho * adv[b], np.clip(rho, 1 - eps, 1 + eps) * adv[b])
      s.append(surr - beta * np_k3(pol[b, t], ref[b, t]))
      tokens.append((rho, np_k3(pol[b, t], ref[b, t])))
    rows.append(sum(s))
    per_row.append(sum(s) / max(len(s), 1))
  if norm == "sequence":
    loss = -np.mean(per_row)
  elif norm == "token":
    loss = -sum(rows) / len(tokens)
  else:
    loss = -sum(rows) / pol.size
  rho = np.array([r for r, _ in tokens])
  metrics = {
      "clipfrac": np.mean(np.abs(rho - 1) > eps),
      "kl_mean": np.mean([k for _, k in tokens]),
      "ratio_min": rho.min(),
      "ratio_max": rho.max(),
  }
  return loss, metrics


def np_reinforce(pol, adv, mask):
  return -np.mean([adv[b] * sum(pol[b, mask[b]]) for b in range(pol.shape[0])])


def np_online_ipo(pol, ref, mask, win, tau):
  g = [sum(pol[b, mask[b]] - ref[b, mask[b]]) for b in range(pol.shape[0])]
  return np.mean([(g[2 * i] - g[2 * i + 1] - (win[i] - 0.5) / tau) ** 2 for i in range(len(win))])


def random_batch(seed, batch=8, length=7):
  """Log-probs with NaN outside an uneven completion mask (prompt offset, right padding)."""
  rng = np.random.default_rng(seed)
  pol = -np.abs(rng.normal(size=(batch, length))) - 0.1
  old = pol + 0.3 * rng.normal(size=pol.shape)
  ref = pol + 0.5 * rng.normal(size=pol.shape)
  mask = np.zeros((batch, length), bool)
  for b in range(batch):
    start = rng.integers(0, 3)
    mask[b, start : start + 1 + rng.integers(0, length - start)] = True
  mask[1] = False
  mask[1, -1] = True  # a one-token response
  pol, old, ref = (np.where(mask, x, np.nan).astype(np.float32) for x in (pol, old, ref))
  return pol, old, ref, mask, rng


# ----------------------------------------------------------------------------- vs numpy


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_match_numpy(normalize_std):
  r = np.random.default_rng(0).normal(size=12).astype(np.float32)
  got = pg.group_advantages(r, 4, normalize_std=normalize_std, eps=1e-4)
  want = np_group_advantages(r.astype(np.float64), 4, normalize_std, 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rloo_advantages_match_numpy():
  r = np.random.default_rng(1).normal(size=12).astype(np.float32)
  for k in (2, 3, 4):
    np.testing.assert_allclose(
        pg.rloo_advantages(r, k), np_rloo(r.astype(np.float64), k), rtol=1e-6, atol=1e-6
    )


def test_k3_matches_numpy_and_is_nonnegative():
  rng = np.random.default_rng(2)
  pol, ref = (rng.normal(size=(5, 9)).astype(np.float32) for _ in range(2))
  ref[0, :3] = pol[0, :3]  # equal log-probs: exactly 0
  ref[1, :3] = pol[1, :3] + np.float32(1e-7)
  got = np.asarray(pg.k3_kl(pol, ref))
  np.testing.assert_allclose(got, np_k3(pol.astype(np.float64), ref), rtol=1e-6, atol=1e-6)
  assert (got >= 0).all() and (got[0, :3] == 0).all()


def test_grpo_loss_and_metrics_match_numpy():
  pol, old, ref, mask, rng = random_batch(3)
  adv = rng.normal(size=pol.shape[0]).astype(np.float32)

  @jax.jit
  def all_norms(pol):
    return {
        norm: pg.grpo_loss(pol, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1, length_norm=norm)
        for norm in pg.LENGTH_NORMS
    }

  got = all_norms(pol)
  f64 = [x.astype(np.float64) for x in (pol, old, ref, adv)]
  for norm, (loss, metrics) in got.items():
    want, want_metrics = np_grpo(*f64, mask, 0.2, 0.1, norm)
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6, err_msg=norm)
    for name, value in want_metrics.items():
      np.testing.assert_allclose(metrics[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
  assert 0 < want_metrics["clipfrac"] < 1  # the batch exercises both branches of the clip
  grads = jax.jit(jax.grad(lambda p: sum(v[0] for v in all_norms(p).values())))(pol)
  assert np.isfinite(grads).all() and (np.asarray(grads)[~mask] == 0).all()  # NaN slots ignored


def test_grpo_clipped_tokens_get_no_gradient():
  pol = np.log(np.array([[0.5, 0.5, 0.5, 0.5]], np.float32))
  old = pol - np.array([[0.5, 0.0, -0.5, 0.1]], np.float32)  # ρ = e^0.5, 1, e^-0.5, e^0.1
  mask = np.ones_like(pol, bool)
  grad = jax.jit(jax.grad(lambda p, a: pg.grpo_loss(p, old, old, a, mask, kl_coef=0.0)[0]))
  for adv, zero in ((1.0, [True, False, False, False]), (-1.0, [False, False, True, False])):
    g = grad(pol, jnp.array([adv]))
    np.testing.assert_array_equal(np.asarray(g)[0] == 0, zero)


def test_reinforce_loss_matches_numpy():
  pol, _, _, mask, rng = random_batch(4)
  adv = rng.normal(size=pol.shape[0]).astype(np.float32)
  got = jax.jit(pg.reinforce_loss)(pol, adv, mask)
  np.testing.assert_allclose(got, np_reinforce(pol.astype(np.float64), adv, mask), rtol=1e-6)


def test_online_ipo_loss_matches_numpy():
  pol, _, ref, mask, rng = random_batch(5)
  win = rng.uniform(size=pol.shape[0] // 2).astype(np.float32)
  fn = jax.jit(functools.partial(pg.online_ipo_loss, tau=0.5))
  loss, metrics = fn(pol, ref, mask, win)
  want = np_online_ipo(pol.astype(np.float64), ref.astype(np.float64), mask, win, 0.5)
  np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)
  swapped = np.arange(pol.shape[0]).reshape(-1, 2)[:, ::-1].reshape(-1)
  np.testing.assert_allclose(  # eq. (8) is symmetric: swap y, y' and P -> 1 - P
      fn(pol[swapped], ref[swapped], mask[swapped], 1 - win)[0], loss, rtol=1e-6
  )
  assert 0 <= metrics["agreement"] <= 1


# ----------------------------------------------------------------------------- group statistics


def test_group_normalisation():
  r = np.random.default_rng(6).normal(size=20).astype(np.float32) * 3 + 1
  a = np.asarray(pg.group_advantages(r, 4)).reshape(5, 4)
  np.testing.assert_allclose(a.mean(axis=1), 0, atol=1e-6)
  std = r.reshape(5, 4).std(axis=1)
  np.testing.assert_allclose(a.std(axis=1), std / (std + 1e-4), rtol=1e-5)
  np.testing.assert_allclose(a.std(axis=1), 1, atol=1e-3)
  centred = np.asarray(pg.group_advantages(r, 4, normalize_std=False)).reshape(5, 4)
  np.testing.assert_allclose(centred.mean(axis=1), 0, atol=1e-6)
  loo = np.asarray(pg.rloo_advantages(r, 4)).reshape(5, 4)
  np.testing.assert_allclose(loo.sum(axis=1), 0, atol=1e-5)
  np.testing.assert_allclose(centred, 0.75 * loo, rtol=1e-6, atol=1e-6)  # (k−1)/k, eq. (2)
  flat = pg.group_advantages(np.full(6, 2.0), 3)  # constant group: zeros, no NaN
  np.testing.assert_array_equal(flat, np.zeros(6))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
  x = np.zeros((4, 3), np.float32)
  mask, adv = np.ones((4, 3), bool), np.zeros(4, np.float32)
  cases = [
      (lambda: pg.group_advantages(np.zeros(5), 2), "group_size=2"),
      (lambda: pg.group_advantages(np.zeros(4), 0), "group_size=0"),
      (lambda: pg.group_advantages(np.zeros(4), 2.0), "group_size=2.0"),
      (lambda: pg.group_advantages(np.zeros((2, 2)), 2), "rewards"),
      (lambda: pg.group_advantages(np.zeros(4), 2, eps=-1.0), "eps=-1.0"),
      (lambda: pg.rloo_advantages(np.zeros(4), 1), "group_size=1"),
      (lambda: pg.rloo_advantages(np.zeros(6), 4), "group_size=4"),
      (lambda: pg.k3_kl(x, x[:, :2]), "ref_logp"),
      (lambda: pg.grpo_loss(x[:, :2], x, x, adv, mask), "policy_logp"),
      (lambda: pg.grpo_loss(x, x, x[:3], adv, mask), "ref_logp"),
      (lambda: pg.grpo_loss(x, x, x, adv[:3], mask), "advantages"),
      (lambda: pg.grpo_loss(x, x, x, adv, mask[0]), "mask"),
      (lambda: pg.grpo_loss(x, x, x, adv, mask, kl_coef=-0.1), "kl_coef=-0.1"),
      (lambda: pg.grpo_loss(x, x, x, adv, mask, clip_eps=-0.2), "clip_eps=-0.2"),
      (lambda: pg.grpo_loss(x, x, x, adv, mask, length_norm="seq"), "length_norm='seq'"),
      (lambda: pg.reinforce_loss(x, adv[:2], mask), "advantages"),
      (lambda: pg.reinforce_loss(x.T, adv, mask), "policy_logp"),
      (lambda: pg.online_ipo_loss(x[:3], x[:3], mask[:3], adv[:1], tau=1.0), "policy_logp"),
      (lambda: pg.online_ipo_loss(x, x, mask, adv, tau=1.0), "win_prob"),
      (lambda: pg.online_ipo_loss(x, x, mask, adv[:2], tau=-1.0), "tau=-1.0"),
      (lambda: pg.online_ipo_loss(x, x, mask, adv[:2], tau=0.0), "tau=0.0"),
  ]
  for call, name in cases:
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(".", r"\.")):
      call()


# ----------------------------------------------------------------------------- enumeration


@functools.lru_cache(maxsize=None)
def responses(eos: bool, length: int = T):
  """All responses as (tokens [N, length] int32, mask [N, length] bool)."""
  seqs, masks = [], []
  for y in itertools.product(range(V), repeat=length):
    n = y.index(EOS) + 1 if eos and EOS in y else length
    if any(y[t] != EOS for t in range(n, length)):
      continue  # after the end every slot holds EOS: one array per response
    seqs.append(y)
    masks.append([t < n for t in range(length)])
  return jnp.array(seqs, jnp.int32), jnp.array(masks)


@jax.jit
def token_logp(theta, seqs):
  """log π(y_t | y_t−1) [N, T] at every slot, masked or not (the losses must ignore those)."""
  prev = jnp.concatenate([jnp.full((seqs.shape[0], 1), BOS), seqs[:, :-1]], axis=1)
  logits = theta[jnp.arange(seqs.shape[1]), prev]  # [N, T, V]
  return jnp.take_along_axis(jax.nn.log_softmax(logits), seqs[..., None], axis=-1)[..., 0]


@jax.jit
def seq_logprob(theta, seqs, mask):
  return jnp.sum(jnp.where(mask, token_logp(theta, seqs), 0.0), axis=1)


def tabular(seed, length=T, eos=True):
  """(θ, θ_ref, rewards [N]) drawn with numpy."""
  rng = np.random.default_rng(seed)
  theta, ref = (jnp.asarray(rng.normal(size=(length, V + 1, V)), jnp.float32) for _ in range(2))
  rewards = jnp.asarray(rng.normal(size=responses(eos, length)[0].shape[0]), jnp.float32)
  return theta, ref, rewards


def expected_grads(theta, seqs, mask, k, group_loss):
  """∇_θ E_{y_1..k iid π_θ}[group_loss(logp [k, T], mask [k, T], index [k])], exactly.

  group_loss returns a dict of scalar losses; the result is the dict of their gradients.
  """
  tuples = jnp.array(list(itertools.product(range(seqs.shape[0]), repeat=k)))

  def expected(theta):
    logp = token_logp(theta, seqs)
    p = jax.lax.stop_gradient(jnp.exp(seq_logprob(theta, seqs, mask)))
    weights = jnp.prod(p[tuples], axis=1)
    losses = jax.vmap(lambda idx: group_loss(logp[idx], mask[idx], idx))(tuples)
    return {name: jnp.sum(weights * l) for name, l in losses.items()}

  return jax.jit(jax.jacrev(expected))(theta)


@jax.jit
def grad_j(theta, seqs, mask, rewards):
  """∇J, J(θ) = Σ_y π_θ(y) r(y)."""
  return jax.grad(lambda th: jnp.sum(jnp.exp(seq_logprob(th, seqs, mask)) * rewards))(theta)


@functools.partial(jax.jit, static_argnames="reverse")
def sequence_kl(theta, ref, seqs, mask, reverse=False):
  """KL(π_θ ‖ π_ref) of whole responses (KL(π_ref ‖ π_θ) when reverse)."""
  log_p, log_q = seq_logprob(theta, seqs, mask), seq_logprob(ref, seqs, mask)
  if reverse:
    log_p, log_q = log_q, log_p
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


@jax.jit
def kl_grads(theta, ref, seqs, mask):
  """∇ of the forward and reverse sequence KLs and of the per-step reverse KL (eq. 12)."""
  prev = jnp.concatenate([jnp.full((seqs.shape[0], 1), BOS), seqs[:, :-1]], axis=1)
  steps = jnp.arange(seqs.shape[1])

  def per_step(th):  # E_{y~π_θ}[Σ_t m_t KL(π_ref(·|h_t) ‖ π_θ(·|h_t))], prefixes' law frozen
    p = jax.lax.stop_gradient(jnp.exp(seq_logprob(th, seqs, mask)))
    log_pi = jax.nn.log_softmax(th[steps, prev])
    log_ref = jax.nn.log_softmax(ref[steps, prev])
    kl = jnp.sum(jnp.exp(log_ref) * (log_ref - log_pi), axis=-1)  # [N, T]
    return jnp.sum(p * jnp.sum(jnp.where(mask, kl, 0.0), axis=1))

  return {
      "forward": jax.grad(sequence_kl)(theta, ref, seqs, mask),
      "reverse": jax.grad(lambda th: sequence_kl(th, ref, seqs, mask, reverse=True))(theta),
      "per_step": jax.grad(per_step)(theta),
  }


def max_err(a, b):
  return float(jnp.max(jnp.abs(a - b)))


def test_enumeration_is_a_distribution():
  theta, _, _ = tabular(0)
  for eos, n in ((True, 15), (False, 27)):
    seqs, mask = responses(eos)
    assert seqs.shape == (n, T)
    np.testing.assert_allclose(jnp.sum(jnp.exp(seq_logprob(theta, seqs, mask))), 1.0, rtol=1e-6)
  assert sorted(np.asarray(responses(True)[1]).sum(1).tolist()) == [1] + [2] * 2 + [3] * 12


def test_reinforce_gradient_rloo_unbiased_own_mean_scaled():
  """Eq. (10) with uneven lengths: RLOO gives −∇J; the group's own mean −((k−1)/k) ∇J."""
  k = 3
  theta, _, rewards = tabular(1)
  seqs, mask = responses(eos=True)

  def losses(logp, m, idx):
    r = rewards[idx]
    rloo, own = pg.rloo_advantages(r, k), pg.group_advantages(r, k, normalize_std=False)
    return {
        "rloo": pg.reinforce_loss(logp, rloo, m),
        "own_mean": pg.reinforce_loss(logp, own, m),
        # A control that shows the check has power: counting the masked slots is biased.
        "unmasked": pg.reinforce_loss(logp, rloo, jnp.ones_like(m)),
    }

  target = -grad_j(theta, seqs, mask, rewards)
  got = expected_grads(theta, seqs, mask, k, losses)
  assert float(jnp.max(jnp.abs(target))) > 0.1
  assert max_err(got["rloo"], target) < TOL
  assert max_err(got["own_mean"], (k - 1) / k * target) < TOL
  assert max_err(got["own_mean"], target) > 1e-2
  assert max_err(got["unmasked"], target) > 1e-2


def _grpo_losses(rewards, k, variants):
  def losses(logp, m, idx):
    advantages = {
        "rloo": pg.rloo_advantages(rewards[idx], k),
        "own_mean": pg.group_advantages(rewards[idx], k, normalize_std=False),
    }
    old = jax.lax.stop_gradient(logp)  # on-policy: π_old = π_θ, ρ = 1
    return {
        (adv, norm): pg.grpo_loss(
            logp, old, old, advantages[adv], m, kl_coef=0.0, length_norm=norm
        )[0]
        for adv, norm in variants
    }

  return losses


def test_on_policy_grpo_gradient_equal_lengths():
  """Eq. (11), all responses of T tokens: every length_norm gives −(1/T) × eq. (10)."""
  k = 3
  theta, _, rewards = tabular(3, eos=False)
  seqs, mask = responses(eos=False)
  variants = [("rloo", norm) for norm in pg.LENGTH_NORMS] + [("own_mean", "sequence")]
  got = expected_grads(theta, seqs, mask, k, _grpo_losses(rewards, k, variants))
  g = grad_j(theta, seqs, mask, rewards)
  for adv, norm in variants:
    scale = (1.0 if adv == "rloo" else (k - 1) / k) / T
    assert max_err(got[adv, norm], -scale * g) < TOL, (adv, norm)


def test_on_policy_grpo_gradient_uneven_lengths():
  """Eq. (11), lengths 1-3: "constant" is exact; "sequence" and "token" miss every c ∇J."""
  k = 3
  theta, _, rewards = tabular(3)
  seqs, mask = responses(eos=True)
  variants = [("rloo", "constant"), ("own_mean", "constant"), ("rloo", "sequence")]
  variants += [("rloo", "token")]
  got = expected_grads(theta, seqs, mask, k, _grpo_losses(rewards, k, variants))
  g = grad_j(theta, seqs, mask, rewards)
  assert max_err(got["rloo", "constant"], -g / T) < TOL
  assert max_err(got["own_mean", "constant"], -(k - 1) / k * g / T) < TOL
  g = g.reshape(-1)
  for norm in ("sequence", "token"):
    biased = got["rloo", norm].reshape(-1)
    residual = biased - jnp.dot(biased, g) / jnp.dot(g, g) * g  # the part not along ∇J
    assert float(jnp.linalg.norm(residual)) > 1e-2 * float(jnp.linalg.norm(biased)), norm


def test_k3_value_unbiased_gradient_per_step_reverse_kl():
  """Eq. (12), on the 3-token model with uneven lengths."""
  theta, ref, _ = tabular(4)
  seqs, mask = responses(eos=True)
  ref_logp = token_logp(ref, seqs)
  p = jnp.exp(seq_logprob(theta, seqs, mask))
  k3_sums = jnp.sum(jnp.where(mask, pg.k3_kl(token_logp(theta, seqs), ref_logp), 0.0), axis=1)
  kl = sequence_kl(theta, ref, seqs, mask)
  assert float(kl) > 0.1
  assert abs(float(jnp.sum(p * k3_sums)) - float(kl)) < TOL  # value: unbiased

  def losses(logp, m, idx):
    ref_rows, old = ref_logp[idx], jax.lax.stop_gradient(logp)
    g = jnp.sum(jnp.where(m, logp - ref_rows, 0.0), axis=1)
    zero = jnp.zeros(logp.shape[0])
    return {
        "k3": jnp.sum(jnp.where(m, pg.k3_kl(logp, ref_rows), 0.0)),
        # GRPO's KL term (6) with A = 0 and "constant": β/T times the same.
        "grpo": pg.grpo_loss(logp, old, ref_rows, zero, m, kl_coef=0.5, length_norm="constant")[0],
        # The score-function form: the KL as a reward penalty, A = −g(y).
        "penalty": pg.reinforce_loss(logp, -jax.lax.stop_gradient(g), m),
    }

  got = expected_grads(theta, seqs, mask, 1, losses)
  want = kl_grads(theta, ref, seqs, mask)
  assert max_err(got["k3"], want["per_step"]) < TOL
  assert max_err(got["grpo"], 0.5 / T * want["per_step"]) < TOL
  assert max_err(got["penalty"], want["forward"]) < TOL
  # k3's gradient is neither sequence KL's gradient.
  assert max_err(got["k3"], want["forward"]) > 1e-2
  assert max_err(got["k3"], want["reverse"]) > 1e-2


def test_k3_gradient_is_the_reverse_kl_gradient_for_one_token():
  """Eq. (12) with T = 1: E[∇ k3] = ∇ KL(π_ref ‖ π_θ)."""
  theta, ref, _ = tabular(5, length=1, eos=False)
  seqs, mask = responses(eos=False, length=1)
  ref_logp = token_logp(ref, seqs)

  def losses(logp, m, idx):
    return {"k3": jnp.sum(jnp.where(m, pg.k3_kl(logp, ref_logp[idx]), 0.0))}

  got = expected_grads(theta, seqs, mask, 1, losses)["k3"]
  reverse = kl_grads(theta, ref, seqs, mask)["reverse"]
  assert float(jnp.max(jnp.abs(reverse))) > 0.05
  assert max_err(got, reverse) < TOL


def test_online_ipo_gradient_is_self_play_on_the_regularised_game():
  """Eq. (13), with a non-transitive preference and uneven lengths; and 0/1 labels, eq. (8)."""
  tau = 0.5
  theta, ref, _ = tabular(6)
  seqs, mask = responses(eos=True)
  n = seqs.shape[0]
  s = jnp.asarray(np.random.default_rng(7).normal(size=(n, n)) * 2.0, jnp.float32)
  pref = jax.nn.sigmoid(s - s.T)  # P(y ≻ y') + P(y' ≻ y) = 1, from no reward
  ref_logp = token_logp(ref, seqs)

  def losses(logp, m, idx):
    p, r = pref[idx[0], idx[1]], ref_logp[idx]
    win = pg.online_ipo_loss(logp, r, m, jnp.ones(1), tau=tau)[0]
    lose = pg.online_ipo_loss(logp, r, m, jnp.zeros(1), tau=tau)[0]
    return {
        "soft": pg.online_ipo_loss(logp, r, m, p[None], tau=tau)[0],
        "label": p * win + (1 - p) * lose,  # E over I ~ Bernoulli(P) of a hard label
    }

  got = expected_grads(theta, seqs, mask, 2, losses)

  def game(theta_prime):
    opponent = jax.lax.stop_gradient(jnp.exp(seq_logprob(theta, seqs, mask)))
    p = jnp.exp(seq_logprob(theta_prime, seqs, mask))
    return jnp.sum(p * (pref @ opponent)) - tau * sequence_kl(theta_prime, ref, seqs, mask)

  target = -4.0 / tau * jax.jit(jax.grad(game))(theta)
  assert float(jnp.max(jnp.abs(target))) > 0.1
  assert max_err(got["soft"], target) < TOL
  assert max_err(got["label"], got["soft"]) < TOL
