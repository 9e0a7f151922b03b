"""DPO, IPO and SPPO against independent re-implementations and their exact bandit minimisers.

The bandit tests minimise each population loss (the exact expectation over all pairs, no
sampling) for a tabular softmax policy over K actions with L-BFGS in float64, and compare the
result with the minimiser derived in `alignjax/algorithms/dpo.py`'s docstring, computed here
independently (closed forms, numpy least squares, scipy root finding).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.special

from alignjax.algorithms import dpo

K = 5

# ----------------------------------------------------------------------------- references


def _batch(seed, b=64):
  """Summed log-probs of plausible size, soft labels in [0, 1], weights with a few zeros."""
  rng = np.random.default_rng(seed)
  pc, pr, rc, rr = rng.normal(-12.0, 3.0, size=(4, b))
  win_c, win_r = rng.uniform(size=(2, b))
  weights = rng.uniform(size=b) * (rng.uniform(size=b) > 0.2)
  return pc, pr, rc, rr, win_c, win_r, weights


def _wmean(x, w):
  return (x * w).sum() / w.sum()


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _trl_dpo(pc, pr, rc, rr, beta, label_smoothing, w):
  """TRL DPOTrainer's "sigmoid" loss and reward metrics, transcribed to numpy float64."""
  pc, pr, rc, rr = (np.asarray(v, np.float64) for v in (pc, pr, rc, rr))
  logits = (pc - pr) - (rc - rr)
  losses = (
      -_log_sigmoid(beta * logits) * (1 - label_smoothing)
      - _log_sigmoid(-beta * logits) * label_smoothing
  )
  chosen_rewards = beta * (pc - rc)
  rejected_rewards = beta * (pr - rr)
  return _wmean(losses, w), {
      "rewards_chosen": _wmean(chosen_rewards, w),
      "rewards_rejected": _wmean(rejected_rewards, w),
      "reward_margin": _wmean(chosen_rewards - rejected_rewards, w),
      "accuracy": _wmean((chosen_rewards > rejected_rewards).astype(np.float64), w),
  }


def _np_ipo(pc, pr, rc, rr, tau, w):
  """Azar et al. 2023's empirical IPO loss, in numpy float64."""
  h = np.log(np.exp(pc) * np.exp(rr) / (np.exp(pr) * np.exp(rc)))  # h_π(y_w, y_l) as written
  return _wmean((h - 0.5 / tau) ** 2, w)


def _np_sppo(p, r, win, eta, w):
  return _wmean((p - r - eta * (win - 0.5)) ** 2, w)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_dpo_matches_trl_formulas(label_smoothing, weighted):
  pc, pr, rc, rr, _, _, w = _batch(0)
  w = w if weighted else np.ones_like(w)
  beta = 0.3
  want_loss, want_metrics = _trl_dpo(pc, pr, rc, rr, beta, label_smoothing, w)
  kw = dict(beta=beta, label_smoothing=label_smoothing, weights=w if weighted else None)
  # float32 inputs (the reference sees the same rounded values): float32 arithmetic only.
  args32 = [np.float32(v) for v in (pc, pr, rc, rr)]
  want32, want_metrics32 = _trl_dpo(*args32, beta, label_smoothing, w)
  loss, metrics = dpo.dpo_loss(*map(jnp.asarray, args32), **kw)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want32, rtol=1e-6)
  for key, value in want_metrics32.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
  with jax.enable_x64(True):
    loss, metrics = jax.jit(functools.partial(dpo.dpo_loss, **kw))(pc, pr, rc, rr)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    for key, value in want_metrics.items():
      np.testing.assert_allclose(metrics[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


def test_rpo_is_dpo_plus_the_chosen_per_token_nll():
  """TRL's rpo_alpha term: α · (−log π_θ(y_c) / |y_c|), weighted like the DPO term."""
  pc, pr, rc, rr, _, _, w = _batch(2)
  lengths = np.random.default_rng(3).integers(1, 9, size=pc.shape)
  beta, alpha = 0.2, 0.7
  with jax.enable_x64(True):
    loss, metrics = dpo.rpo_loss(pc, pr, rc, rr, lengths, beta=beta, alpha=alpha, weights=w)
    dpo_part, _ = _trl_dpo(pc, pr, rc, rr, beta, 0.0, w)
    nll = _wmean(-pc / lengths, w)
    np.testing.assert_allclose(metrics["nll_chosen"], nll, rtol=1e-12)
    np.testing.assert_allclose(loss, dpo_part + alpha * nll, rtol=1e-12)
    np.testing.assert_allclose(
        dpo.rpo_loss(pc, pr, rc, rr, lengths, beta=beta, alpha=0.0)[0],
        dpo.dpo_loss(pc, pr, rc, rr, beta=beta)[0],
        rtol=1e-12,
    )
    # The NLL's gradient reaches the chosen log-probs only: d/d pc = dDPO/dpc − α w/(|y_c| Σw).
    g = jax.grad(
        lambda x: dpo.rpo_loss(x, pr, rc, rr, lengths, beta=beta, alpha=alpha, weights=w)[0]
    )(pc)
    g0 = jax.grad(lambda x: dpo.dpo_loss(x, pr, rc, rr, beta=beta, weights=w)[0])(pc)
    np.testing.assert_allclose(g - g0, -alpha * w / lengths / w.sum(), rtol=1e-10, atol=1e-14)
  with pytest.raises(ValueError, match="alpha=-1"):
    dpo.rpo_loss(pc, pr, rc, rr, lengths, beta=beta, alpha=-1.0)
  with pytest.raises(ValueError, match="chosen_lengths has shape"):
    dpo.rpo_loss(pc, pr, rc, rr, lengths[:3], beta=beta, alpha=1.0)


def test_ipo_and_sppo_match_numpy():
  pc, pr, rc, rr, win_c, win_r, w = _batch(1, b=48)
  tau, eta = 0.4, 2.5
  with jax.enable_x64(True):
    np.testing.assert_allclose(
        dpo.ipo_loss(pc, pr, rc, rr, tau=tau, weights=w)[0],
        _np_ipo(pc, pr, rc, rr, tau, w),
        rtol=1e-10,
    )
    np.testing.assert_allclose(
        dpo.ipo_loss(pc, pr, rc, rr, tau=tau)[0],
        _np_ipo(pc, pr, rc, rr, tau, np.ones_like(w)),
        rtol=1e-10,
    )
    loss, metrics = dpo.sppo_loss(pc, rc, win_c, eta=eta, weights=w)
    np.testing.assert_allclose(loss, _np_sppo(pc, rc, win_c, eta, w), rtol=1e-12)
    np.testing.assert_allclose(metrics["log_ratio"], _wmean(pc - rc, w), rtol=1e-12)
    np.testing.assert_allclose(metrics["target"], _wmean(eta * (win_c - 0.5), w), rtol=1e-12)
    # The pair form (6), as the SPPO code writes it: ((a - η(P_w - ½))² + (b - η(P_l - ½))²) / 2.
    a, b = pc - rc, pr - rr
    pair = _wmean(((a - eta * (win_c - 0.5)) ** 2 + (b - eta * (win_r - 0.5)) ** 2) / 2, w)
    np.testing.assert_allclose(
        dpo.sppo_pair_loss(pc, pr, rc, rr, win_c, win_r, eta=eta, weights=w)[0], pair, rtol=1e-12
    )
    # Only the pair's own preference probability: P_r = 1 − P_c (the SPPO code's "single" form).
    single = _wmean(((a - eta * (win_c - 0.5)) ** 2 + (b + eta * (win_c - 0.5)) ** 2) / 2, w)
    np.testing.assert_allclose(
        dpo.sppo_pair_loss(pc, pr, rc, rr, win_c, eta=eta, weights=w)[0], single, rtol=1e-12
    )
  # float32 inputs against the float64 reference on the same rounded values.
  args32 = [np.float32(v) for v in (pc, pr, rc, rr)]
  np.testing.assert_allclose(
      dpo.ipo_loss(*args32, tau=tau, weights=w)[0],
      _np_ipo(*[np.float64(v) for v in args32], tau, w),
      rtol=1e-6,
  )


def test_low_precision_inputs_run_in_float32():
  pc, pr, rc, rr, win_c, _, _ = (jnp.asarray(v, jnp.bfloat16) for v in _batch(2, b=8))
  assert dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)[0].dtype == jnp.float32
  assert dpo.ipo_loss(pc, pr, rc, rr, tau=0.1)[0].dtype == jnp.float32
  assert dpo.sppo_loss(pc, rc, win_c, eta=1.0)[0].dtype == jnp.float32


def test_all_zero_weights_give_zero_loss():
  pc, pr, rc, rr, _, _, _ = _batch(3, b=4)
  loss, metrics = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1, weights=np.zeros(4))
  assert float(loss) == 0.0 and all(np.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- gradients


def _central_difference(f, x, step=1e-6):
  x = np.asarray(x, np.float64)
  grad = np.empty_like(x)
  for i in range(x.size):
    e = np.zeros_like(x)
    e.flat[i] = step
    grad.flat[i] = (float(f(x + e)) - float(f(x - e))) / (2 * step)
  return grad


@pytest.mark.parametrize("loss_name", ["dpo", "ipo", "sppo", "sppo_pair"])
def test_gradients_match_central_differences(loss_name):
  pc, pr, rc, rr, win_c, win_r, w = _batch(4, b=6)
  losses = {
      "dpo": lambda x: dpo.dpo_loss(x[0], x[1], rc, rr, beta=0.7, label_smoothing=0.1, weights=w),
      "ipo": lambda x: dpo.ipo_loss(x[0], x[1], rc, rr, tau=0.3, weights=w),
      "sppo": lambda x: dpo.sppo_loss(x[0], rc, win_c, eta=1.5, weights=w),
      "sppo_pair": lambda x: dpo.sppo_pair_loss(x[0], x[1], rc, rr, win_c, win_r, eta=1.5),
  }
  with jax.enable_x64(True):
    f = jax.jit(lambda x: losses[loss_name](x)[0])
    # Keep the DPO margins O(1) so the logistic is not saturated.
    x = np.stack([rc + np.linspace(-1, 1, 6), rr + np.linspace(1, -1, 6) ** 2])
    grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
    np.testing.assert_allclose(grad, _central_difference(f, x), rtol=1e-6, atol=1e-9)
    assert np.abs(grad).max() > 1e-3  # not trivially zero


def test_dpo_gradient_matches_its_closed_form():
  pc, pr, rc, rr, _, _, w = _batch(5, b=16)
  beta, eps = 0.05, 0.2
  with jax.enable_x64(True):
    g_pc, g_pr = jax.grad(
        lambda a, b: dpo.dpo_loss(a, b, rc, rr, beta=beta, label_smoothing=eps, weights=w)[0],
        argnums=(0, 1),
    )(jnp.asarray(pc), jnp.asarray(pr))
  # dℓ/dh = −β [(1 − ε) σ(−βh) − ε σ(βh)], and dh/dπ_c = 1, dh/dπ_r = −1.
  h = (pc - pr) - (rc - rr)
  dl_dh = -beta * ((1 - eps) * scipy.special.expit(-beta * h) - eps * scipy.special.expit(beta * h))
  np.testing.assert_allclose(g_pc, dl_dh * w / w.sum(), rtol=1e-10, atol=1e-16)
  np.testing.assert_allclose(g_pr, -dl_dh * w / w.sum(), rtol=1e-10, atol=1e-16)


# ----------------------------------------------------------------------------- bandit


def _lbfgs(f, x0, max_iter=200, tol=1e-11):
  """Minimises f from x0 with optax's L-BFGS inside one lax.while_loop (call under jit)."""
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(f)

  def step(carry):
    x, state = carry
    value, grad = value_and_grad(x, state=state)
    updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
    return optax.apply_updates(x, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  x, state = jax.lax.while_loop(keep_going, step, (x0, opt.init(x0)))
  return x, optax.tree.get(state, "count"), optax.tree.norm(optax.tree.get(state, "grad"))


def _bandit(seed):
  rng = np.random.default_rng(seed)
  log_ref = np.log(scipy.special.softmax(rng.normal(size=K)))  # non-uniform reference
  return rng, log_ref


def _ordered_pairs():
  i, j = np.nonzero(~np.eye(K, dtype=bool))
  return i, j


def _pair_design(design, log_ref):
  """μ over ordered pairs i ≠ j (symmetric): uniform, or π_ref(i) π_ref(j)."""
  i, j = _ordered_pairs()
  if design == "uniform":
    return np.ones(i.size) / i.size
  mu = np.exp(log_ref[i] + log_ref[j])
  return mu / mu.sum()


@functools.partial(jax.jit, static_argnames="loss_name")
def _solve(loss_name, log_ref, weights, strength):
  """Tabular softmax policy (logits θ, from θ = log π_ref) minimising a population loss.

  Pair losses: every ordered pair (i, j), i ≠ j, enters as (chosen i, rejected j) with weight
  μ_ij P(i ≻ j) (`weights` [K(K−1)]). SPPO: every action y with weight π_t(y) (`weights` [K],
  log π_t = log_ref; the win-probabilities are passed in `strength`'s place: (η, P)).
  One compiled program per loss; the data and the hyperparameters are traced.
  """
  i, j = _ordered_pairs()

  def population_loss(theta):
    log_pi = jax.nn.log_softmax(theta)
    if loss_name == "sppo":
      eta, win = strength
      return dpo.sppo_loss(log_pi, log_ref, win, eta=eta, weights=weights)[0]
    args = (log_pi[i], log_pi[j], log_ref[i], log_ref[j])
    if loss_name == "dpo":
      return dpo.dpo_loss(*args, beta=strength, weights=weights)[0]
    return dpo.ipo_loss(*args, tau=strength, weights=weights)[0]

  theta, count, grad_norm = _lbfgs(population_loss, log_ref)
  return jax.nn.log_softmax(theta), count, grad_norm


def _optimise(loss_name, log_ref, weights, strength):
  log_pi, count, grad_norm = _solve(loss_name, log_ref, weights, strength)
  return np.asarray(log_pi), int(count), float(grad_norm)


def _log_prob_error(log_pi, log_target):
  """max |log π − log π*| (both normalised) and the total variation distance."""
  log_target = log_target - scipy.special.logsumexp(log_target)
  return np.abs(log_pi - log_target).max(), 0.5 * np.abs(np.exp(log_pi) - np.exp(log_target)).sum()


@pytest.mark.parametrize("design", ["uniform", "reference"])
def test_dpo_on_a_bandit_converges_to_the_tilted_reference(design):
  with jax.enable_x64(True):
    rng, log_ref = _bandit(10)
    r = rng.normal(size=K) * 2.0
    beta = 0.5
    i, j = _ordered_pairs()
    p = scipy.special.expit(r[i] - r[j])  # Bradley–Terry: P(i ≻ j) = σ(r_i − r_j)
    weights = _pair_design(design, log_ref) * p
    log_pi, count, grad_norm = _optimise("dpo", log_ref, weights, beta)
  max_err, tv = _log_prob_error(log_pi, log_ref + r / beta)  # π* ∝ π_ref exp(r / β)
  print(f"DPO {design}: {count} L-BFGS steps, |grad| {grad_norm:.1e}, max|Δlog π| {max_err:.2e}")
  assert max_err < 1e-8 and tv < 1e-8
  # The optimum is sharp: a policy tilted by r/(2β) instead is far from it.
  assert _log_prob_error(log_pi, log_ref + r / (2 * beta))[0] > 0.1


def _ipo_least_squares(p, mu, tau):
  """argmin_g Σ_{i≠j} μ_ij P(i ≻ j) (g_i − g_j − 1/(2τ))², by numpy least squares (centred)."""
  i, j = _ordered_pairs()
  w = mu * p[i, j]
  design = np.zeros((i.size, K))
  design[np.arange(i.size), i] = 1.0
  design[np.arange(i.size), j] = -1.0
  sw = np.sqrt(w)[:, None]
  g = np.linalg.lstsq(design * sw, sw[:, 0] * 0.5 / tau, rcond=None)[0]
  return g - g.mean()


@pytest.mark.parametrize("design", ["uniform", "reference"])
def test_ipo_on_a_bandit_reaches_its_least_squares_fixed_point(design):
  with jax.enable_x64(True):
    rng, log_ref = _bandit(11)
    # A general (intransitive) preference: P(i ≻ j) + P(j ≻ i) = 1, P(i ≻ i) = ½.
    upper = np.triu(rng.uniform(0.05, 0.95, size=(K, K)), 1)
    p = upper + np.tril(1.0 - upper.T, -1) + 0.5 * np.eye(K)
    tau = 0.8
    mu = _pair_design(design, log_ref)
    i, j = _ordered_pairs()
    log_pi, count, grad_norm = _optimise("ipo", log_ref, mu * p[i, j], tau)
  g_star = _ipo_least_squares(p, mu, tau)
  if design == "uniform":
    # The closed form of the docstring: g_i = (1/τ)(1/K) Σ_j (P(i ≻ j) − ½) + c.
    closed = (p - 0.5).mean(axis=1) / tau
    np.testing.assert_allclose(g_star, closed - closed.mean(), atol=1e-12)
  max_err, tv = _log_prob_error(log_pi, log_ref + g_star)
  print(f"IPO {design}: {count} L-BFGS steps, |grad| {grad_norm:.1e}, max|Δlog π| {max_err:.2e}")
  assert max_err < 1e-8 and tv < 1e-8
  # The per-pair targets (P(i ≻ j) − ½)/τ are not all met: an intransitive P is not a gradient.
  g = log_pi - log_ref
  assert np.abs((g[i] - g[j]) - (p[i, j] - 0.5) / tau).max() > 1e-2


def _sppo_setup(seed, eta):
  rng = np.random.default_rng(seed)
  log_t = np.log(scipy.special.softmax(rng.normal(size=K)))  # the opponent π_t
  upper = np.triu(rng.uniform(0.05, 0.95, size=(K, K)), 1)
  p = upper + np.tril(1.0 - upper.T, -1) + 0.5 * np.eye(K)
  win = p @ np.exp(log_t)  # P(y ≻ π_t) = Σ_y' π_t(y') P(y ≻ y')
  log_z = scipy.special.logsumexp(log_t + eta * win)  # Z_t = Σ_y π_t(y) exp(η P(y ≻ π_t))
  return log_t, win, log_z


def _optimise_sppo(log_t, win, eta):
  """Tabular softmax policy minimising E_{y ~ π_t}[eq. (5)] over all K actions."""
  return _optimise("sppo", log_t, np.exp(log_t), (eta, win))


def _sppo_normalised_minimiser(log_t, win, eta):
  """argmin Σ_y π_t(y) (g_y − a_y)² s.t. Σ_y π_t(y) e^{g_y} = 1, a = η(P − ½), from the KKT
  condition g + κ e^g = a, i.e. g = a − W(κ e^a) (Lambert W), κ found by root finding."""
  a = eta * (win - 0.5)

  def g_of(kappa):
    return a - np.real(scipy.special.lambertw(kappa * np.exp(a)))

  def normalisation(kappa):
    return scipy.special.logsumexp(log_t + g_of(kappa))

  kappa = scipy.optimize.brentq(normalisation, 0.0, 10.0, xtol=1e-15, rtol=1e-15)
  return log_t + g_of(kappa), kappa


@pytest.mark.parametrize("eta", [1.0, 3.0])
def test_sppo_on_a_bandit(eta):
  log_t, win, log_z = _sppo_setup(12, eta)
  mw_update = log_t + eta * win - log_z  # SPPO's exact step: π_{t+1} ∝ π_t exp(η P(y ≻ π_t))
  with jax.enable_x64(True):
    # (a) With the exact log-partition as baseline (target ηP − log Z_t) the squared loss is
    # met exactly by a normalised policy: its minimiser is the multiplicative-weights update.
    exact_win = win - log_z / eta + 0.5
    log_pi, count, grad_norm = _optimise_sppo(log_t, exact_win, eta)
    max_err, tv = _log_prob_error(log_pi, mw_update)
    print(f"SPPO η={eta} exact log Z: {count} steps, |grad| {grad_norm:.1e}, {max_err:.2e}")
    assert max_err < 1e-8 and tv < 1e-8
    # (b) Eq. (5) as written (log Z_t ≈ η/2): the target is not normalisable, since
    # E_{π_t}[P(y ≻ π_t)] = ½ and, by Jensen, log Z_t > η/2. The minimiser is the KKT point.
    assert log_z > eta / 2
    log_pi, count, grad_norm = _optimise_sppo(log_t, win, eta)
  kkt, kappa = _sppo_normalised_minimiser(log_t, win, eta)
  max_err, tv = _log_prob_error(log_pi, kkt)
  gap_max, gap_tv = _log_prob_error(log_pi, mw_update)
  print(
      f"SPPO η={eta} eq. (5): {count} steps, |grad| {grad_norm:.1e}, vs KKT {max_err:.2e} "
      f"(κ={kappa:.3g}); vs multiplicative weights: max|Δlog π| {gap_max:.2e}, TV {gap_tv:.2e}"
  )
  assert max_err < 1e-8 and tv < 1e-8
  assert kappa > 0 and gap_max > 1e-4  # close to the exact update, but measurably not it


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_naming_the_argument():
  x, y = jnp.zeros(4), jnp.zeros(3)
  with pytest.raises(ValueError, match="policy_rejected has shape"):
    dpo.dpo_loss(x, y, x, x, beta=0.1)
  with pytest.raises(ValueError, match="ref_rejected has shape"):
    dpo.ipo_loss(x, x, x, y, tau=0.1)
  with pytest.raises(ValueError, match="win_prob has shape"):
    dpo.sppo_loss(x, x, y, eta=1.0)
  with pytest.raises(ValueError, match="win_prob_rejected has shape"):
    dpo.sppo_pair_loss(x, x, x, x, x, y, eta=1.0)
  with pytest.raises(ValueError, match="weights has shape"):
    dpo.dpo_loss(x, x, x, x, beta=0.1, weights=y)
  with pytest.raises(ValueError, match=r"policy_chosen has shape \(2, 2\)"):
    dpo.dpo_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.zeros((2, 2)), beta=1)
  for fn, name in [(dpo.dpo_loss, "beta"), (dpo.ipo_loss, "tau")]:
    for bad in (0.0, -1.0, float("nan")):
      with pytest.raises(ValueError, match=f"{name}="):
        fn(x, x, x, x, **{name: bad})
  with pytest.raises(ValueError, match="eta="):
    dpo.sppo_loss(x, x, x, eta=0.0)
  with pytest.raises(ValueError, match="eta="):
    dpo.sppo_pair_loss(x, x, x, x, x, eta=-2.0)
  with pytest.raises(ValueError, match="beta must be a scalar"):
    dpo.dpo_loss(x, x, x, x, beta=jnp.ones(4))
  with pytest.raises(ValueError, match="label_smoothing="):
    dpo.dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)


def test_traced_hyperparameters_are_accepted_under_jit():
  pc, pr, rc, rr, _, _, _ = _batch(6, b=8)
  f = jax.jit(lambda beta: dpo.dpo_loss(pc, pr, rc, rr, beta=beta)[0])
  np.testing.assert_allclose(f(0.2), dpo.dpo_loss(pc, pr, rc, rr, beta=0.2)[0], rtol=1e-6)
