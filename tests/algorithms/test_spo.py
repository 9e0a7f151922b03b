"""spo: numpy re-implementations, exact expectations by enumeration, self-play vs the LP.

The enumeration model is the one of test_nash_md.py (15 responses of lengths 1-3); expectations
over k = 3 iid responses are sums over all 15³ ordered triples weighted by their probabilities.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_games import RPS, lp_nash, random_game
from test_nash_md import T, responses, seq_logprob, token_logp

from alignjax.algorithms import games, spo
from alignjax.algorithms import policy_gradient as pg

TOL = 1e-5

# ----------------------------------------------------------------------------- vs numpy


def np_rewards(w):
  g, k, _ = w.shape
  return np.array(
      [[np.mean([w[a, i, j] for j in range(k) if j != i]) for i in range(k)] for a in range(g)]
  ).reshape(-1)


def random_wins(rng, groups, k, antisymmetric=True):
  w = rng.uniform(size=(groups, k, k))
  if antisymmetric:
    w = np.triu(w, 1) + np.transpose(1 - np.triu(w, 1), (0, 2, 1)) * np.tril(np.ones((k, k)), -1)
    w[:, np.arange(k), np.arange(k)] = 0.5
  return w.astype(np.float32)


def test_spo_rewards_match_numpy_and_average_one_half():
  rng = np.random.default_rng(0)
  for k in (2, 3, 5):
    w = random_wins(rng, 4, k)
    np.testing.assert_allclose(w + np.transpose(w, (0, 2, 1)), 1.0, atol=1e-6)
    r = np.asarray(spo.spo_rewards(w))
    np.testing.assert_allclose(r, np_rewards(w.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(r.reshape(4, k).mean(1), 0.5, atol=1e-6)  # Σ_i r_i = k/2
  w = random_wins(rng, 1, 4, antisymmetric=False)
  w[0, np.arange(4), np.arange(4)] = 7.0 / 8  # the diagonal is ignored
  np.testing.assert_allclose(spo.spo_rewards(w[0]), np_rewards(w.astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("advantage", spo.ADVANTAGES)
def test_spo_loss_is_grpo_on_spo_advantages(advantage):
  rng = np.random.default_rng(1)
  k, groups, length = 3, 2, 5
  pol = -np.abs(rng.normal(size=(groups * k, length))).astype(np.float32)
  old, ref = (pol + 0.2 * rng.normal(size=pol.shape).astype(np.float32) for _ in range(2))
  mask = rng.uniform(size=pol.shape) < 0.8
  w = random_wins(rng, groups, k)
  r = np_rewards(w.astype(np.float64))
  adv = {  # eq. (3), from the numbers
      "centred": r - 0.5,
      "rloo": k / (k - 1) * (r - 0.5),
      "normalised": (r - 0.5) / (r.reshape(groups, k).std(1).repeat(k) + 1e-4),
  }[advantage]
  kwargs = dict(clip_eps=0.2, kl_coef=0.1, length_norm="sequence")
  fn = jax.jit(functools.partial(spo.spo_loss, advantage=advantage, **kwargs))
  loss, metrics = fn(pol, old, ref, w, mask)
  want, want_metrics = pg.grpo_loss(pol, old, ref, adv.astype(np.float32), mask, **kwargs)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["clipfrac"], want_metrics["clipfrac"])
  np.testing.assert_allclose(metrics["reward_mean"], 0.5, atol=1e-6)


# ----------------------------------------------------------------------------- enumeration


def test_spo_gradient_centred_unbiased_rloo_scaled():
  """Eq. (4): E[∇] = −(1/T) ∇J ("centred"), −(k/(k−1))(1/T) ∇J ("rloo"); J = E P(y ≻ π_θ)."""
  k = 3
  rng = np.random.default_rng(5)
  theta = jnp.asarray(rng.normal(size=(T, 4, 3)), jnp.float32)
  seqs, mask = responses()
  n = seqs.shape[0]
  s = rng.normal(size=(n, n)) * 2.0
  pref = jnp.asarray(1.0 / (1.0 + np.exp(-(s - s.T))), jnp.float32)
  tuples = jnp.array(np.stack(np.meshgrid(*[np.arange(n)] * k, indexing="ij"), -1).reshape(-1, k))

  def expected(th):
    logp = token_logp(th, seqs)
    p = jax.lax.stop_gradient(jnp.exp(seq_logprob(th, seqs, mask)))
    weights = jnp.prod(p[tuples], axis=1)

    def group(idx):
      lp, m, old = logp[idx], mask[idx], jax.lax.stop_gradient(logp[idx])
      w = pref[idx[:, None], idx[None, :]][None]
      return jnp.stack(
          [spo.spo_loss(lp, old, old, w, m, advantage=a, kl_coef=0.0)[0] for a in spo.ADVANTAGES]
      )

    return weights @ jax.vmap(group)(tuples)

  got = jax.jit(jax.jacrev(expected))(theta).reshape(len(spo.ADVANTAGES), -1)

  def objective(th):  # eq. (2), the opponent π_θ frozen
    opponent = jax.lax.stop_gradient(jnp.exp(seq_logprob(theta, seqs, mask)))
    return jnp.sum(jnp.exp(seq_logprob(th, seqs, mask)) * (pref @ opponent))

  g = jax.jit(jax.grad(objective))(theta).reshape(-1)
  assert float(jnp.abs(g).max()) > 0.01
  centred, rloo, normalised = got
  assert float(jnp.abs(centred + g / T).max()) < TOL
  assert float(jnp.abs(rloo + k / (k - 1) * g / T).max()) < TOL
  residual = normalised - jnp.dot(normalised, g) / jnp.dot(g, g) * g
  assert float(jnp.linalg.norm(residual)) > 1e-2 * float(jnp.linalg.norm(normalised))


# ----------------------------------------------------------------------------- self-play


def test_self_play_step_matches_numpy():
  p = random_game(7, n=4)
  logits = np.array([1.0, -0.5, 0.2, 0.0])
  average, iterates = spo.self_play(p, eta=0.3, steps=4, logits=logits)
  pi = np.exp(logits) / np.exp(logits).sum()
  history = []
  for _ in range(4):
    history.append(pi)
    pi = pi * np.exp(0.3 * (p @ pi - 0.5))
    pi /= pi.sum()
  np.testing.assert_allclose(iterates, history, atol=1e-6)
  np.testing.assert_allclose(average, np.cumsum(history, 0) / np.arange(1, 5)[:, None], atol=1e-6)


@pytest.mark.parametrize("name", ["rps", "random5"])
def test_self_play_average_iterate_reaches_the_minimax_winner(name):
  """Eq. (5) with η = sqrt(8 ln n / T): exploitability(π̄_T) ≤ ln(1/min π_0) / (ηT) + η/8."""
  p = {"rps": RPS, "random5": random_game(0)}[name]
  n, steps = p.shape[0], 20_000
  eta = float(np.sqrt(8 * np.log(n) / steps))
  start = np.array([1.0, 0.0, -0.5, 0.5, 0.0][:n])  # not the equilibrium
  average, iterates = spo.self_play(p, eta=eta, steps=steps, logits=start)
  average, iterates = np.asarray(average, np.float64), np.asarray(iterates, np.float64)
  gaps = np.max(average @ p.T, axis=1) - 0.5  # exploitability of π̄_t, eq. (3) of games.py
  regret = (np.max(np.cumsum(iterates @ p.T - 0.5, 0), axis=1)) / np.arange(1, steps + 1)
  np.testing.assert_allclose(gaps, regret, atol=1e-5)  # exploitability = average regret
  lp, value = lp_nash(p)
  log_start = start - np.log(np.sum(np.exp(start)))
  bound = -log_start.min() / (eta * steps) + eta / 8  # Hedge's regret bound / T
  last = float(games.exploitability(p, iterates[-1] / iterates[-1].sum()))
  first = int(np.argmax(gaps < 0.01)) + 1
  print(
      f"SPO self-play {name}: η={eta:.4f}, exploitability(π̄_T) at T=100,1000,20000 ="
      f" {gaps[[99, 999, -1]]}, bound {bound:.3g}, first T below 0.01: {first},"
      f" last iterate {last:.3g},"
      f" LP value {value:.2g}, |π̄_T − π_LP|_1 = {np.abs(average[-1] - lp).sum():.3g}"
  )
  assert gaps[-1] <= bound < 0.01
  assert last > 10 * gaps[-1]  # the last iterate cycles: averaging is what converges
  np.testing.assert_allclose(average[-1], lp, atol=0.02)  # the LP's (unique) equilibrium


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem():
  x, mask = np.zeros((3, 4), np.float32), np.ones((3, 4), bool)
  w = np.full((1, 3, 3), 0.5, np.float32)
  cases = [
      (lambda: spo.spo_rewards(np.full((2, 1, 1), 0.5)), "k=1"),
      (lambda: spo.spo_rewards(np.full((2, 3), 0.5)), "win_matrix: shape"),
      (lambda: spo.spo_rewards(np.full((2, 2), 1.5)), r"in \[0, 1\]"),
      (lambda: spo.spo_loss(x, x, x, w, mask, advantage="grpo"), "advantage='grpo'"),
      (lambda: spo.spo_loss(x, x, x, np.full((2, 3, 3), 0.5), mask), "advantages"),
      (lambda: spo.spo_loss(x, x, x, w, mask, clip_eps=0.0), "clip_eps=0.0"),
      (lambda: spo.self_play(RPS, eta=0.0, steps=10), "eta=0.0"),
      (lambda: spo.self_play(RPS, eta=1.0, steps=0), "steps=0"),
      (lambda: spo.self_play(np.full((3, 3), 0.6), eta=1.0, steps=10), "not antisymmetric"),
      (lambda: spo.self_play(RPS, eta=1.0, steps=10, logits=np.zeros(2)), "logits"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
