"""nash_md: numpy re-implementations, exact expectations by enumeration, tabular convergence.

The enumeration model (as in test_policy_gradient.py): vocabulary V = 3, at most T = 3 tokens,
logits θ[t, previous token, v]; token 0 ends a response, giving 15 responses of lengths 1-3. The
expected gradient over y ~ π_θ and y' ~ π^β (the per-token mixture, frozen) is a weighted sum
over all 225 pairs, so the unbiasedness checks hold to float32 rounding.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.algorithms import games, nash_md
from alignjax.algorithms import policy_gradient as pg

V, T, BOS, EOS = 3, 3, 3, 0
TOL = 1e-5
RPS = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])
CYCLE = np.array([[0.5, 0.9, 0.3], [0.1, 0.5, 0.6], [0.7, 0.4, 0.5]])
MU = np.array([0.6, 0.3, 0.1])

# ----------------------------------------------------------------------------- vs numpy


def np_nash_md(pol, ref, mask, win, tau, estimator):
  total = 0.0
  for b in range(pol.shape[0]):
    idx = np.flatnonzero(mask[b])
    ratio = pol[b, idx] - ref[b, idx]
    for n, t in enumerate(idx):
      penalty = ratio.sum() if estimator == "sequence" else ratio[n:].sum()
      total += (win[b] - 0.5 - tau * penalty) * pol[b, t]
  return -total / pol.shape[0]


def random_batch(seed, batch=6, length=7):
  rng = np.random.default_rng(seed)
  pol = -np.abs(rng.normal(size=(batch, length))) - 0.1
  ref = pol + 0.5 * rng.normal(size=pol.shape)
  mask = np.zeros((batch, length), bool)
  for b in range(batch):
    start = rng.integers(0, 3)
    mask[b, start : start + 1 + rng.integers(0, length - start)] = True
  pol, ref = (np.where(mask, x, np.nan).astype(np.float32) for x in (pol, ref))
  return pol, ref, mask, rng.uniform(size=batch).astype(np.float32)


@pytest.mark.parametrize("estimator", nash_md.KL_ESTIMATORS)
def test_nash_md_loss_matches_numpy(estimator):
  pol, ref, mask, win = random_batch(0)
  fn = jax.jit(functools.partial(nash_md.nash_md_loss, tau=0.3, kl_estimator=estimator))
  loss, metrics = fn(pol, ref, mask, win)
  f64 = [x.astype(np.float64) for x in (pol, ref)]
  np.testing.assert_allclose(loss, np_nash_md(*f64, mask, win, 0.3, estimator), rtol=1e-5)
  g = np.nansum(np.where(mask, f64[0] - f64[1], 0.0), axis=1)
  np.testing.assert_allclose(metrics["kl_mean"], g.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["advantage_mean"], np.mean(win - 0.5 - 0.3 * g), rtol=1e-5)
  grads = jax.grad(lambda p: fn(p, ref, mask, win)[0])(pol)
  assert np.isfinite(grads).all() and (np.asarray(grads)[~mask] == 0).all()  # NaN slots ignored


def test_mixture_logits_endpoints():
  rng = np.random.default_rng(1)
  a, b = (rng.normal(size=(2, 5, 4)).astype(np.float32) for _ in range(2))
  log_a = np.asarray(jax.nn.log_softmax(a))
  np.testing.assert_allclose(nash_md.mixture_logits(a, b, beta=0.0), log_a, atol=1e-6)
  np.testing.assert_allclose(
      nash_md.mixture_logits(a, b, beta=1.0), jax.nn.log_softmax(b), atol=1e-6
  )
  mixed = np.exp(nash_md.mixture_logits(a, b, beta=0.4))
  np.testing.assert_allclose(mixed.sum(-1), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- enumeration


@functools.lru_cache(maxsize=None)
def responses():
  """All 15 responses: (tokens [N, T] int32, mask [N, T] bool); after the end, slots hold EOS."""
  seqs, masks = [], []
  for y in itertools.product(range(V), repeat=T):
    n = y.index(EOS) + 1 if EOS in y else T
    if all(y[t] == EOS for t in range(n, T)):
      seqs.append(y)
      masks.append([t < n for t in range(T)])
  return jnp.array(seqs, jnp.int32), jnp.array(masks)


@jax.jit
def token_logp(theta, seqs):
  prev = jnp.concatenate([jnp.full((seqs.shape[0], 1), BOS), seqs[:, :-1]], axis=1)
  logits = theta[jnp.arange(seqs.shape[1]), prev]
  return jnp.take_along_axis(jax.nn.log_softmax(logits), seqs[..., None], axis=-1)[..., 0]


@jax.jit
def seq_logprob(theta, seqs, mask):
  return jnp.sum(jnp.where(mask, token_logp(theta, seqs), 0.0), axis=1)


def setup(seed, beta=0.3):
  """θ, θ_ref, a non-transitive preference over responses, and the opponent law q = π^β."""
  rng = np.random.default_rng(seed)
  theta, ref = (jnp.asarray(rng.normal(size=(T, V + 1, V)), jnp.float32) for _ in range(2))
  seqs, mask = responses()
  s = rng.normal(size=(seqs.shape[0],) * 2) * 2.0
  pref = jnp.asarray(1.0 / (1.0 + np.exp(-(s - s.T))), jnp.float32)
  q = jnp.exp(seq_logprob(nash_md.mixture_logits(theta, ref, beta=beta), seqs, mask))
  return theta, ref, pref, q


def per_pair_grads(theta, ref, pref, loss_fns):
  """Per-pair gradients [N, N, ...] of each loss_fn(logp [1, T], ref [1, T], m [1, T], P [1])."""
  seqs, mask = responses()
  ref_logp = token_logp(ref, seqs)

  def one(th, i, j):
    logp = token_logp(th, seqs)
    rows = (logp[i][None], ref_logp[i][None], mask[i][None], pref[i, j][None])
    return {name: fn(*rows) for name, fn in loss_fns.items()}

  n = seqs.shape[0]
  i, j = (x.reshape(-1) for x in jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij"))
  grads = jax.jit(jax.vmap(jax.jacrev(one), in_axes=(None, 0, 0)))(theta, i, j)
  return {k: g.reshape(n, n, -1) for k, g in grads.items()}


def target_grad(theta, ref, pref, q, tau):
  """−∇J, J(θ') = Σ_y π_θ'(y) P(y ≻ q) − τ KL(π_θ' ‖ π_ref), q frozen (eq. 1)."""
  seqs, mask = responses()

  def objective(th):
    log_p, log_ref = seq_logprob(th, seqs, mask), seq_logprob(ref, seqs, mask)
    p = jnp.exp(log_p)
    return jnp.sum(p * (pref @ q)) - tau * jnp.sum(p * (log_p - log_ref))

  return -jax.jit(jax.grad(objective))(theta).reshape(-1)


def test_nash_md_gradient_is_unbiased_both_estimators():
  """Eqs. (2)-(6); a 0/1 judgement (4); the differentiated k3 penalty (7) as a biased control."""
  tau = 0.5
  theta, ref, pref, q = setup(2)
  seqs, mask = responses()

  def loss(estimator, win=None):
    return lambda lp, r, m, p: nash_md.nash_md_loss(
        lp, r, m, p if win is None else jnp.full(1, win), tau=tau, kl_estimator=estimator
    )[0]

  def k3(lp, r, m, p):
    surrogate = -(p[0] - 0.5) * jnp.sum(jnp.where(m, lp, 0.0))
    return surrogate + tau * jnp.sum(jnp.where(m, pg.k3_kl(lp, r), 0.0))

  fns = {e: loss(e) for e in nash_md.KL_ESTIMATORS}
  fns |= {"win": loss("causal", 1.0), "lose": loss("causal", 0.0), "k3": k3}
  grads = per_pair_grads(theta, ref, pref, fns)
  weights = jnp.exp(seq_logprob(theta, seqs, mask))[:, None] * q[None, :]  # y ~ π_θ, y' ~ q
  mean = {k: jnp.einsum("ij,ijp->p", weights, g) for k, g in grads.items()}
  want = target_grad(theta, ref, pref, q, tau)
  assert float(jnp.abs(want).max()) > 0.1
  for estimator in nash_md.KL_ESTIMATORS:
    assert float(jnp.abs(mean[estimator] - want).max()) < TOL, estimator
  label = jnp.einsum("ij,ijp->p", weights * pref, grads["win"])
  label += jnp.einsum("ij,ijp->p", weights * (1 - pref), grads["lose"])
  assert float(jnp.abs(label - want).max()) < TOL  # I ~ Bernoulli(P) in place of P
  assert float(jnp.abs(mean["k3"] - want).max()) > 1e-2  # eq. (7): biased

  # Variance (trace of the covariance of the per-pair gradient): the causal form drops noise.
  variance = {
      e: float(jnp.einsum("ij,ijp->", weights, (grads[e] - mean[e]) ** 2))
      for e in nash_md.KL_ESTIMATORS
  }
  print(f"Nash-MD-PG gradient variance: {variance}")
  assert variance["causal"] < variance["sequence"]


def test_opponent_mixture_per_token_is_not_the_sequence_mixture():
  """Module docstring: the per-token mixture differs from ∝ π_θ(y)^(1−β) π_ref(y)^β for T > 1."""
  theta, ref, _, q = setup(3, beta=0.5)
  seqs, mask = responses()
  log_seq = 0.5 * seq_logprob(theta, seqs, mask) + 0.5 * seq_logprob(ref, seqs, mask)
  sequence_mixture = jax.nn.softmax(log_seq)
  np.testing.assert_allclose(jnp.sum(q), 1.0, rtol=1e-6)
  assert float(jnp.abs(q - sequence_mixture).max()) > 1e-3


# ----------------------------------------------------------------------------- tabular


def np_step(log_pi, p, mu, eta, beta):
  """Eqs. (8)-(9) in float64."""
  pi = np.exp(log_pi) / np.exp(log_pi).sum()
  mixed = pi ** (1 - beta) * mu**beta
  mixed /= mixed.sum()
  new = mixed * np.exp(eta * p @ mixed)
  return new / new.sum(), mixed


def test_nash_md_step_matches_numpy_and_is_the_argmax():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=3)
  eta, tau = 0.7, 0.5
  got = np.exp(nash_md.nash_md_step(logits, CYCLE, np.log(MU), eta=eta, tau=tau))
  want, mixed = np_step(logits, CYCLE, MU, eta, eta * tau)
  np.testing.assert_allclose(got, want, atol=1e-6)
  explicit = nash_md.nash_md_step(logits, CYCLE, np.log(MU), eta=eta, tau=tau, beta=eta * tau)
  np.testing.assert_allclose(np.exp(explicit), got, atol=1e-7)

  def objective(pi):  # eq. (9): η P(π ≻ π^μ) − KL(π ‖ π^μ)
    return eta * pi @ CYCLE @ mixed - np.sum(pi * np.log(pi / mixed))

  best = objective(want)
  for _ in range(50):
    other = want * np.exp(0.1 * rng.normal(size=3))
    assert objective(other / other.sum()) < best


def np_kl(log_p, log_q):
  """KL(p ‖ q) in float64 after renormalising (float32 inputs)."""
  log_p, log_q = (np.asarray(x, np.float64) for x in (log_p, log_q))
  log_p, log_q = (x - np.log(np.sum(np.exp(x))) for x in (log_p, log_q))
  return float(np.sum(np.exp(log_p) * (log_p - log_q)))


@pytest.mark.parametrize("name", ["rps", "cycle"])
@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_nash_md_last_iterate_converges_within_the_bound(name, tau):
  """Eq. (10): η_t = 2 / (τ (t + 2)); KL(π*_τ ‖ π_T) at T = 10, 100, 1000."""
  p = {"rps": RPS, "cycle": CYCLE}[name]
  star, residual = games.regularized_nash(p, np.log(MU), tau=tau)
  assert float(residual) < 1e-5
  trajectory = nash_md.nash_md(p, np.log(MU), tau=tau, steps=1000)
  kls = [np_kl(star, trajectory[t]) for t in (10, 100, 1000)]
  bounds = [8 / (tau**2 * (t + 1)) for t in (10, 100, 1000)]
  print(f"Nash-MD {name} τ={tau}: KL(π*‖π_T) at T=10,100,1000 = {kls}, bound {bounds}")
  assert kls[0] > kls[1] > kls[2] >= 0
  assert all(kl < bound for kl, bound in zip(kls, bounds))
  assert kls[2] < 1e-6
  for t in (0, 7):  # the scan is the step with η_t
    eta = 2 / (tau * (t + 2))
    step = nash_md.nash_md_step(trajectory[t], p, np.log(MU), eta=eta, tau=tau)
    np.testing.assert_allclose(step, trajectory[t + 1], atol=1e-5)


def test_constant_step_converges_to_a_neighbourhood():
  """A constant η with ητ ≤ 1 converges geometrically to within O(η/τ) of π*_τ."""
  tau = 0.5
  star, _ = games.regularized_nash(CYCLE, np.log(MU), tau=tau)
  kls = [
      np_kl(star, nash_md.nash_md(CYCLE, np.log(MU), tau=tau, steps=400, eta=eta)[-1])
      for eta in (0.4, 0.1)
  ]
  assert kls[1] < kls[0] < 2 * 0.4 / tau


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem():
  x, mask, win = np.zeros((2, 3), np.float32), np.ones((2, 3), bool), np.full(2, 0.5)
  not_antisymmetric = np.array([[0.5, 0.7], [0.7, 0.5]])
  cases = [
      (lambda: nash_md.nash_md_loss(x, x, mask, win, tau=0.0), "tau=0.0"),
      (lambda: nash_md.nash_md_loss(x, x, mask, win, tau=-1.0), "tau=-1.0"),
      (lambda: nash_md.nash_md_loss(x, x, mask, win[:1], tau=1.0), "win_prob"),
      (
          lambda: nash_md.nash_md_loss(x, x, mask, win + 1, tau=1.0),
          r"win_prob: must lie in \[0, 1\]",
      ),
      (lambda: nash_md.nash_md_loss(x, x[:1], mask, win, tau=1.0), "ref_logp"),
      (
          lambda: nash_md.nash_md_loss(x, x, mask, win, tau=1.0, kl_estimator="k3"),
          "kl_estimator='k3'",
      ),
      (lambda: nash_md.mixture_logits(x, x, beta=1.5), "beta=1.5"),
      (lambda: nash_md.mixture_logits(x, x, beta=-0.5), "beta=-0.5"),
      (lambda: nash_md.nash_md_step(np.zeros(3), RPS, np.zeros(3), eta=0.0, tau=1.0), "eta=0.0"),
      (lambda: nash_md.nash_md_step(np.zeros(3), RPS, np.zeros(3), eta=1.0, tau=-1.0), "tau=-1.0"),
      (
          lambda: nash_md.nash_md_step(np.zeros(3), RPS, np.zeros(3), eta=3.0, tau=1.0),
          "eta \\* tau",
      ),
      (
          lambda: nash_md.nash_md_step(np.zeros(3), RPS, np.zeros(3), eta=1.0, tau=1.0, beta=2.0),
          "beta=2.0",
      ),
      (
          lambda: nash_md.nash_md_step(
              np.zeros(2), not_antisymmetric, np.zeros(2), eta=1.0, tau=1.0
          ),
          "not antisymmetric",
      ),
      (
          lambda: nash_md.nash_md_step(np.zeros(3), RPS * 2 - 0.5, np.zeros(3), eta=1.0, tau=1.0),
          r"\[0, 1\]",
      ),
      (lambda: nash_md.nash_md_step(np.zeros(2), RPS, np.zeros(3), eta=1.0, tau=1.0), "logits"),
      (lambda: nash_md.nash_md(RPS, np.zeros(3), tau=1.0, steps=0), "steps=0"),
      (lambda: nash_md.nash_md(RPS, np.zeros(3), tau=1.0, steps=5, eta=2.0), "eta \\* tau"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
