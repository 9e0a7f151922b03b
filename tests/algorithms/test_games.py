"""games: checks and game quantities by hand, solvers against scipy, and the majority example.

The regularised equilibrium is checked against scipy's root finder on the KKT conditions in
float64 (independent of the damped iteration), the Bradley–Terry fit against scipy.optimize on
the likelihood, and the majority-voter example compares Nash-MD, SPO and RLHF on one game.
"""

import numpy as np
import pytest
import scipy.optimize

from alignjax.algorithms import games, nash_md, spo

RPS = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])  # rock, paper, scissors
CYCLE = np.array([[0.5, 0.9, 0.3], [0.1, 0.5, 0.6], [0.7, 0.4, 0.5]])  # unequal cycle strengths
R, G, B = 0, 1, 2
VOTERS = [[R, G, B]] * 2 + [[B, R, G]] * 3


def random_game(seed, n=5):
  """A non-transitive game: P = σ(2 (M − Mᵀ)) for a Gaussian M."""
  m = np.random.default_rng(seed).normal(size=(n, n))
  return 1.0 / (1.0 + np.exp(-2.0 * (m - m.T)))


def kkt_nash(p, mu, tau):
  """π*_τ from scipy's root finder on z = log μ + P softmax(z) / τ (float64; games.py eq. 5)."""

  def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()

  z = scipy.optimize.fsolve(lambda z: z - np.log(mu) - p @ softmax(z) / tau, np.log(mu), xtol=1e-13)
  return softmax(z)


def lp_nash(p):
  """A maximin strategy of the symmetric game A = P − ½ by linprog: min v s.t. A π ≤ v."""
  n = p.shape[0]
  a = p - 0.5
  res = scipy.optimize.linprog(
      c=np.r_[np.zeros(n), 1.0],
      A_ub=np.c_[a, -np.ones(n)],
      b_ub=np.zeros(n),
      A_eq=np.r_[np.ones(n), 0.0][None],
      b_eq=[1.0],
      bounds=[(0, None)] * n + [(None, None)],
  )
  assert res.status == 0
  return res.x[:n], res.x[n]


# ----------------------------------------------------------------------------- checks, by hand


def test_preference_from_rankings_by_hand():
  p = games.preference_from_rankings(VOTERS)
  want = np.array([[0.5, 1.0, 0.4], [0.0, 0.5, 0.4], [0.6, 0.6, 0.5]])
  np.testing.assert_allclose(p, want, atol=1e-12)
  assert (p[B] >= 0.5).all()  # B is the Condorcet winner: it beats each other option by majority
  games.check_preference(p)


def test_win_rate_and_exploitability_by_hand():
  np.testing.assert_allclose(games.win_rate(RPS, [1.0, 0, 0]), [0.5, 1.0, 0.0])
  assert abs(float(games.exploitability(RPS, np.ones(3) / 3))) < 1e-7
  assert float(games.exploitability(RPS, [1.0, 0, 0])) == 0.5  # paper beats rock
  p = random_game(0)
  for seed in range(5):
    pi = np.random.default_rng(seed).dirichlet(np.ones(5))
    np.testing.assert_allclose(pi @ p @ pi, 0.5, atol=1e-12)  # eq. (2)
    assert float(games.exploitability(p, pi)) >= -1e-7  # eq. (3)


def test_geometric_mixture_matches_numpy():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 4, 6))
  for beta in (0.0, 0.3, 1.0):
    mixed = (1 - beta) * (a - np.log(np.exp(a).sum(-1, keepdims=True))) + beta * (
        b - np.log(np.exp(b).sum(-1, keepdims=True))
    )
    want = mixed - np.log(np.exp(mixed).sum(-1, keepdims=True))
    np.testing.assert_allclose(games.geometric_mixture(a, b, beta=beta), want, atol=1e-5)


# ----------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("name", ["rps", "cycle", "random"])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_regularized_nash_agrees_with_kkt_root(name, tau):
  p = {"rps": RPS, "cycle": CYCLE, "random": random_game(2)}[name]
  mu = np.random.default_rng(3).dirichlet(np.ones(p.shape[0]) * 2)
  log_pi, residual = games.regularized_nash(p, np.log(mu), tau=tau)
  want = kkt_nash(p, mu, tau)
  log_z = np.log(np.sum(mu * np.exp(p @ want / tau)))
  np.testing.assert_allclose(np.log(want / mu), p @ want / tau - log_z, atol=1e-9)  # eq. (5)
  assert float(residual) < 1e-5
  np.testing.assert_allclose(np.exp(log_pi), want, atol=2e-6)
  assert np.abs(want - mu).max() > 0.05  # the equilibrium is not the reference


def test_bradley_terry_fit_matches_scipy_and_recovers_a_bt_model():
  r = np.array([1.0, -0.5, 0.3, -0.8])
  bt = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))
  np.testing.assert_allclose(games.bradley_terry_fit(bt), r - r.mean(), atol=1e-4)
  p = games.preference_from_rankings(VOTERS)

  def nll(r):
    d = r[:, None] - r[None, :]
    return -np.sum((1 - np.eye(3)) * p * -np.logaddexp(0.0, -d))

  want = scipy.optimize.minimize(nll, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
  np.testing.assert_allclose(games.bradley_terry_fit(p), want - want.mean(), atol=1e-4)


def test_rlhf_policy_is_the_gibbs_policy():
  r, mu = np.array([0.2, -0.1, 0.5]), np.array([0.5, 0.3, 0.2])
  want = mu * np.exp(r / 0.25)
  np.testing.assert_allclose(np.exp(games.rlhf_policy(r, np.log(mu), tau=0.25)), want / want.sum())


def test_lp_reference_value_is_zero():
  for p in (RPS, CYCLE, random_game(4)):
    pi, value = lp_nash(p)
    assert abs(value) < 1e-9 and float(games.exploitability(p, pi)) < 1e-6


# ----------------------------------------------------------------------------- majority voters


def test_majority_nash_md_and_spo_pick_the_condorcet_winner_rlhf_does_not():
  p = games.preference_from_rankings(VOTERS)
  uniform = np.zeros(3)
  tau = 0.05
  nash = np.exp(nash_md.nash_md(p, uniform, tau=tau, steps=2000)[-1])
  star = np.exp(games.regularized_nash(p, uniform, tau=tau)[0])
  average, _ = spo.self_play(p, eta=0.5, steps=2000)
  rewards = games.bradley_terry_fit(p)
  rlhf = np.exp(games.rlhf_policy(rewards, uniform, tau=0.1))
  print(f"majority: Nash-MD π_T={nash}, π*_τ={star}, SPO π̄={np.asarray(average[-1])}")
  print(f"majority: BT rewards={np.asarray(rewards)}, RLHF π={rlhf}")
  np.testing.assert_allclose(nash, star, atol=1e-3)
  assert nash.argmax() == B and nash[B] > 0.8
  assert average[-1].argmax() == B and average[-1][B] > 0.95
  assert float(games.exploitability(p, average[-1])) < 0.01
  assert rewards.argmax() == R and rlhf.argmax() == R and rlhf[R] > 0.9
  lp, _ = lp_nash(p)
  np.testing.assert_allclose(lp, [0, 0, 1], atol=1e-9)  # the minimax winner is B itself


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem():
  cases = [
      (lambda: games.check_preference(np.full((2, 3), 0.5)), "must be square"),
      (lambda: games.check_preference(np.array([[0.5, 1.2], [-0.2, 0.5]])), r"in \[0, 1\]"),
      (lambda: games.check_preference(np.array([[0.5, 0.7], [0.7, 0.5]])), "not antisymmetric"),
      (lambda: games.check_preference(np.array([[0.4, 0.5], [0.5, 0.6]])), "not antisymmetric"),
      (lambda: games.check_preference(np.array([[0.5, np.nan], [0.5, 0.5]])), r"in \[0, 1\]"),
      (lambda: games.win_rate(RPS, [0.5, 0.5]), "probs"),
      (lambda: games.win_rate(RPS, [0.5, 0.6, 0.2]), "probability vector"),
      (lambda: games.geometric_mixture(np.zeros(3), np.zeros(3), beta=1.5), "beta=1.5"),
      (lambda: games.geometric_mixture(np.zeros(3), np.zeros(3), beta=-0.1), "beta=-0.1"),
      (lambda: games.geometric_mixture(np.zeros(3), np.zeros(4), beta=0.5), "ref_logits"),
      (lambda: games.regularized_nash(RPS, np.zeros(3), tau=0.0), "tau=0.0"),
      (lambda: games.regularized_nash(RPS, np.zeros(2), tau=1.0), "ref_logits"),
      (lambda: games.rlhf_policy(np.zeros(3), np.zeros(3), tau=-1.0), "tau=-1.0"),
      (lambda: games.bradley_terry_fit(RPS, iterations=0), "iterations=0"),
      (lambda: games.preference_from_rankings([[0, 1, 1]]), "permutation"),
      (lambda: games.preference_from_rankings([]), "at least one voter"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
