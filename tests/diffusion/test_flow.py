"""Flow matching loss, score/drift identities and the Euler ODE / Euler–Maruyama samplers.

Also checks the closed-form toy velocities of alignjax.models.toy (eqs. 1-3 there) against the
continuity equation and a least-squares regression, since the sampler tests rely on them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.diffusion import flow
from alignjax.models import toy

MU = np.array([1.0, -0.5])
S = 0.6


class NumpyVel:
  """v(x, t) = tanh(x W + t a): the same function in jax and numpy (float64)."""

  def __init__(self, seed=0):
    rng = np.random.default_rng(seed)
    self.w, self.a = rng.normal(size=(2, 2)), rng.normal(size=(2,))

  def jax(self, x, t):
    return jnp.tanh(x @ jnp.asarray(self.w, jnp.float32) + t[:, None] * jnp.asarray(self.a))

  def numpy(self, x, t):
    return np.tanh(x @ self.w + t[:, None] * self.a)


def test_flow_matching_loss_matches_numpy():
  vel = NumpyVel()
  rng = np.random.default_rng(1)
  x0, x1 = rng.normal(size=(16, 2)), rng.normal(size=(16, 2)) + 3.0
  t = rng.uniform(size=16)
  xt = (1 - t[:, None]) * x0 + t[:, None] * x1
  want = np.mean(np.sum((vel.numpy(xt, t) - (x1 - x0)) ** 2, axis=1))
  got = flow.flow_matching_loss(vel.jax, *(jnp.asarray(a, jnp.float32) for a in (x0, x1, t)))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(
      flow.interpolate(jnp.asarray(x0), jnp.asarray(x1), jnp.asarray(t)), xt, rtol=1e-5, atol=1e-6
  )


def test_flow_matching_loss_is_minimised_by_the_true_velocity():
  """With Gaussian data, eq. 2's minimiser E[X1 - X0 | X_t] is toy eq. 2: a perturbed field
  gives a larger Monte-Carlo loss on the same samples."""
  key = jax.random.key(0)
  x1 = jnp.asarray(MU, jnp.float32) + S * jax.random.normal(key, (20000, 2))
  x0, t = flow.sample_noise_and_time(x1, jax.random.key(1))
  v = toy.gaussian_velocity(MU, S)
  best = flow.flow_matching_loss(v, x0, x1, t)
  for delta in (0.1, -0.1):
    worse = flow.flow_matching_loss(lambda x, t: v(x, t) + delta, x0, x1, t)
    assert float(worse) > float(best) + 0.015


def test_loss_shape_errors():
  x = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match="x0.shape"):
    flow.flow_matching_loss(lambda x, t: x, x, jnp.zeros((4, 3)), jnp.zeros(4))
  with pytest.raises(ValueError, match="t.shape"):
    flow.flow_matching_loss(lambda x, t: x, x, x, jnp.zeros(3))


def test_gaussian_velocity_matches_regression():
  """E[X1 - X0 | X_t = x] is linear for Gaussian data: least squares recovers toy eq. 2."""
  rng = np.random.default_rng(0)
  n, t = 200_000, 0.3
  x0, x1 = rng.normal(size=(n, 2)), MU + S * rng.normal(size=(n, 2))
  xt = (1 - t) * x0 + t * x1
  for d in range(2):
    design = np.stack([np.ones(n), xt[:, d]], axis=1)
    coef, *_ = np.linalg.lstsq(design, x1[:, d] - x0[:, d], rcond=None)
    probe = np.array([[-1.0, 0.5], [2.0, -2.0]])
    want = coef[0] + coef[1] * probe[:, d]
    got = toy.gaussian_velocity(MU, S)(jnp.asarray(probe, jnp.float32), jnp.full(2, t))[:, d]
    np.testing.assert_allclose(got, want, atol=0.02)


def _continuity_residual(logp_fn, vel_fn, x, t):
  """∂_t log p + ∇·v + v·∇ log p at one point (zero for the flow of p_t)."""
  lp = lambda x, t: logp_fn(x[None], t[None])[0]
  v = lambda x, t: vel_fn(x[None], t[None])[0]
  dlp_dt = jax.grad(lp, argnums=1)(x, t)
  div = jnp.trace(jax.jacfwd(v)(x, t))
  return dlp_dt + div + v(x, t) @ jax.grad(lp)(x, t)


@pytest.mark.parametrize("mixture", [False, True])
def test_toy_velocities_satisfy_continuity_equation(mixture):
  if mixture:
    w, mus, ss = [0.3, 0.7], [[-1.5, 0.2], [1.0, 0.5]], [0.4, 0.8]
    logp = lambda x, t: toy.mixture_log_density(w, mus, ss, x, t)[0]
    vel = toy.mixture_velocity(w, mus, ss)
  else:

    def logp(x, t):
      m, var = toy.gaussian_marginal(MU, S, t)
      return -0.5 * jnp.sum((x - m) ** 2, -1) / var[:, 0] - jnp.log(2 * jnp.pi * var[:, 0])

    vel = toy.gaussian_velocity(MU, S)
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(9, 2)), jnp.float32)
  ts = jnp.repeat(jnp.array([0.05, 0.4, 0.9], jnp.float32), 3)
  res = jax.jit(jax.vmap(lambda x, t: _continuity_residual(logp, vel, x, t)))(xs, ts)
  assert np.max(np.abs(np.asarray(res))) < 1e-4, res
  # a wrong field (the Gaussian velocity of another mean) violates it
  wrong = toy.gaussian_velocity(MU + 0.5, S)
  r = _continuity_residual(logp, wrong, jnp.zeros(2), jnp.float32(0.5))
  assert abs(float(r)) > 0.1


def test_mixture_velocity_reduces_to_gaussian():
  x, t = jax.random.normal(jax.random.key(0), (8, 2)), jnp.linspace(0.0, 0.95, 8)
  one = toy.mixture_velocity([1.0], [MU], [S])(x, t)
  two = toy.mixture_velocity([0.2, 0.8], [MU, MU], [S, S])(x, t)
  want = toy.gaussian_velocity(MU, S)(x, t)
  np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(two, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="mixture shapes"):
    toy.mixture_velocity([1.0, 1.0], [MU], [S])
  with pytest.raises(ValueError, match="std"):
    toy.gaussian_velocity(MU, 0.0)


def test_score_and_drift_identities():
  """Eq. 3 equals the Gaussian marginal's score; eq. 4 with σ² = 2η is 2v − x/t (eq. 5)."""
  x = jax.random.normal(jax.random.key(0), (6, 2))
  t = jnp.array([0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
  v = toy.gaussian_velocity(MU, S)(x, t)
  m, var = toy.gaussian_marginal(MU, S, t)
  np.testing.assert_allclose(
      flow.score_from_velocity(v, x, t), -(x - m) / var, rtol=1e-4, atol=1e-5
  )
  sigma = flow.memoryless_sigma(0.0)(t)
  np.testing.assert_allclose(sigma, np.sqrt(2 * (1 - t) / t), rtol=1e-6)
  np.testing.assert_allclose(
      flow.drift_from_velocity(v, x, t, sigma), 2 * v - x / t[:, None], rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
      flow.memoryless_sigma(0.05)(jnp.array([0.0, 1.0])),
      [np.sqrt(2 * 1.05 / 0.05), np.sqrt(2 * 0.05 / 1.05)],
      rtol=1e-6,
  )


def test_sigma_and_grid_errors():
  with pytest.raises(ValueError, match="shift"):
    flow.memoryless_sigma(-0.1)
  with pytest.raises(ValueError, match="sigma"):
    flow.constant_sigma(-1.0)
  with pytest.raises(ValueError, match="num_steps"):
    flow.time_grid(0)
  with pytest.raises(ValueError, match="key"):
    flow.sample_sde(
        lambda x, t: x, jnp.zeros((2, 2)), None, num_steps=3, sigma_fn=flow.zero_sigma()
    )


def _moments(x):
  x = np.asarray(x, np.float64)
  return x.mean(0), x.std(0)


def test_euler_ode_transports_noise_to_gaussian():
  x0 = jax.random.normal(jax.random.key(0), (20000, 2))
  traj = jax.jit(lambda x: flow.sample_ode(toy.gaussian_velocity(MU, S), x, num_steps=200))(x0)
  assert traj.states.shape == (20000, 201, 2) and traj.times.shape == (201,)
  np.testing.assert_array_equal(traj.states[:, 0], x0)
  np.testing.assert_allclose(traj.times, np.arange(201) / 200, atol=1e-7)
  mean, std = _moments(traj.final)
  # sampling error of the mean: S/sqrt(20000) = 0.004; Euler bias O(1/K) on the std.
  np.testing.assert_allclose(mean, MU, atol=0.015)
  np.testing.assert_allclose(std, S, rtol=0.01)


def test_sde_with_zero_sigma_is_the_ode():
  vel = toy.gaussian_velocity(MU, S)
  x0 = jax.random.normal(jax.random.key(0), (64, 2))
  ode = flow.sample_ode(vel, x0, num_steps=10)
  sde = flow.sample_sde(vel, x0, jax.random.key(1), num_steps=10, sigma_fn=flow.zero_sigma())
  np.testing.assert_allclose(sde.states, ode.states, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["memoryless", "constant"])
def test_sde_keeps_the_base_marginal(kind):
  """Eq. 4's drift correction: the SDE ends at N(μ, S²) like the flow; only the memoryless σ
  makes X_1 independent of X_0 (eq. 5)."""
  k = 40
  sigma_fn = flow.memoryless_sigma(1.0 / k) if kind == "memoryless" else flow.constant_sigma(1.0)
  x0 = jax.random.normal(jax.random.key(0), (20000, 2))
  run = jax.jit(
      lambda x, key: flow.sample_sde(
          toy.gaussian_velocity(MU, S), x, key, num_steps=k, sigma_fn=sigma_fn
      )
  )
  traj = run(x0, jax.random.key(1))
  assert traj.states.shape == (20000, k + 1, 2)
  mean, std = _moments(traj.final)
  np.testing.assert_allclose(mean, MU, atol=0.015)
  np.testing.assert_allclose(std, S, rtol=0.02)
  corr = np.corrcoef(np.asarray(x0[:, 0]), np.asarray(traj.final[:, 0]))[0, 1]
  if kind == "memoryless":
    assert abs(corr) < 0.03, corr
  else:
    assert corr > 0.15, corr
  # explicit keys: same key, same path; another key, another path
  np.testing.assert_array_equal(run(x0, jax.random.key(1)).final, traj.final)
  assert not np.allclose(run(x0, jax.random.key(2)).final, traj.final)


# ----------------------------------------------------------------------------- velocity models


def test_unet_velocity_runs_the_timestep_scale_backwards():
  """Eq. 8 with exact values: the net sees τ = 1000 (1 − t) and the cond unchanged."""
  net = lambda x, tau, c: x * tau[:, None] + c[:, None]
  vel = flow.unet_velocity(net, 1000.0)
  x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
  t = jnp.asarray([0.0, 0.75])
  v = vel(x, t, jnp.asarray([1.0, 2.0]))
  np.testing.assert_array_equal(v, [[1001.0, 2001.0], [752.0, 1002.0]])


def test_guided_velocity_combines_one_call_of_2b_examples():
  """Eq. 9 with exact values for v(x, t, c) = (c + 1) x + t, null class 10, w = 3:
  v_w = 11 x + t + 3 ((c + 1) x − 11 x) = (3c − 19) x + t; w = 1 is vel_fn itself."""
  calls = []

  def vel(x, t, c):
    calls.append(x.shape[0])
    return (c.astype(jnp.float32) + 1.0)[:, None] * x + t[:, None]

  x = jnp.asarray([[1.0, -2.0], [0.5, 4.0], [2.0, 1.0]])
  t = jnp.asarray([0.25, 0.5, 0.75])
  c = jnp.asarray([0, 4, 9], jnp.int32)
  v = flow.guided_velocity(vel, 3.0, 10)(x, t, c)
  expected = (3.0 * np.array([0, 4, 9]) - 19.0)[:, None] * np.asarray(x) + np.asarray(t)[:, None]
  np.testing.assert_array_equal(v, expected)
  assert calls == [6]
  assert flow.guided_velocity(vel, 1.0, 10) is vel


def test_guided_velocity_takes_pytree_conditions_and_null():
  """A text-like cond {"emb" [B, S], "ids" [B, S]} with a null of the same structure: the
  null embedding (one example's, [S]) is broadcast to each example; v = x · mean(emb)."""

  def vel(x, t, c):
    np.testing.assert_array_equal(c["ids"], np.repeat([[1], [0]], 2, axis=0) * np.ones((1, 4)))
    return x * jnp.mean(c["emb"], axis=1, keepdims=True)

  x = jnp.asarray([[1.0, 2.0], [3.0, -1.0]])
  cond = {"emb": jnp.asarray([[1.0, 3.0, 1.0, 3.0], [4.0] * 4]), "ids": jnp.ones((2, 4), jnp.int32)}
  null = {"emb": jnp.asarray([0.5, 0.5, 0.5, 0.5]), "ids": 0}
  v = flow.guided_velocity(vel, 2.0, null)(x, jnp.zeros(2), cond)
  # v_w = 0.5 x + 2 (m x − 0.5 x) with per-example means m = (2, 4)
  np.testing.assert_array_equal(v, np.asarray(x) * np.array([[3.5], [7.5]]))
