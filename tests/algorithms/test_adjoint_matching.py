"""Adjoint Matching: discrete adjoint vs autodiff, the loss's factors, and exact tilts.

Exact targets (alignjax.models.toy eqs. 4-5): fine-tuning a base with terminal law p_base
against r(x) = c·x and multiplier λ must give p_base(x) exp(λ r(x)) / Z, which is again a
Gaussian (mixture) in closed form. Only the memoryless schedule reaches it; a constant σ
carries the initial value-function bias (shifts the mean by λ Cov(X_1 | X_0) c instead).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax.algorithms import adjoint_matching as am
from alignjax.diffusion import flow
from alignjax.models import toy
from alignjax.training import TrainState

MU, S = np.array([0.5, -0.5]), 0.6
C, LAM = np.array([1.0, 0.5]), 3.0  # shift λ S² c = (1.08, 0.54), |shift| = 1.21
MIX_W, MIX_MU, MIX_S = (
    np.array([0.5, 0.5]),
    np.array([[-1.0, 0.0], [1.0, 0.0]]),
    np.array([0.5, 0.5]),
)
SIGN_W, SIGN_MU, SIGN_S = (
    np.array([0.4, 0.6]),
    np.array([[-1.0, 0.5], [1.0, -0.5]]),
    np.array([0.5, 0.6]),
)
BASES = {
    "gauss": toy.gaussian_velocity(MU, S),
    "mix": toy.mixture_velocity(MIX_W, MIX_MU, MIX_S),
    "sign": toy.mixture_velocity(SIGN_W, SIGN_MU, SIGN_S),
}


def linear_reward(c):
  c = jnp.asarray(c, jnp.float32)
  return lambda x: x @ c


@functools.lru_cache(maxsize=None)
def _compiled(base_name, sigma, num_steps, batch, num_timesteps, lr, steps):
  """One jitted update per configuration: r(x) = frozen["c"]·x with λ = 1 (so λ and c enter
  as the data frozen["c"] = λ c, and runs that differ only in them or in seeds share it)."""
  base = BASES[base_name]
  graphdef, _ = nnx.split(toy.VelocityMLP(2, rngs=nnx.Rngs(0)))
  builder = lambda p, frozen: toy.residual_velocity(graphdef, p, base)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))
  sigma_fn = None if sigma is None else flow.constant_sigma(sigma)
  update = jax.jit(
      am.make_update_fn(
          builder,
          lambda frozen: base,
          lambda frozen: linear_reward(frozen["c"]),
          opt,
          lam=1.0,
          num_steps=num_steps,
          batch_size=batch,
          shape=(2,),
          sigma_fn=sigma_fn,
          num_timesteps=num_timesteps,
      ),
      donate_argnums=0,
  )
  sample = jax.jit(
      lambda p, x0, key: am.sample_memoryless(
          builder(p, {}), x0, key, num_steps=num_steps, sigma_fn=sigma_fn
      ).final
  )
  return update, sample, opt


def finetune_and_sample(
    base_name,
    c,
    lam,
    *,
    sigma=None,
    num_steps=20,
    steps=200,
    batch=64,
    num_timesteps=10,
    lr=1e-3,
    seed=0,
    n=8192,
):
  """Adjoint Matching on v_θ = base + VelocityMLP (r = c·x, multiplier λ), then n samples of
  the fine-tuned SDE (memoryless, or constant σ if given) as float64 [n, 2]."""
  update, sample, opt = _compiled(base_name, sigma, num_steps, batch, num_timesteps, lr, steps)
  _, params = nnx.split(toy.VelocityMLP(2, rngs=nnx.Rngs(seed)))
  state = TrainState.create(params, opt, jax.random.key(seed))
  frozen = {"c": jnp.asarray(lam * np.asarray(c), jnp.float32)}
  key = jax.random.key(100 + seed)
  for i in range(steps):
    state, metrics = update(state, frozen, jax.random.fold_in(key, i))
  assert int(state.step) == steps and np.isfinite(float(metrics["loss"]))
  x0 = jax.random.normal(jax.random.key(seed + 7), (n, 2))
  return np.asarray(sample(state.params, x0, jax.random.key(seed + 8)), np.float64)


# ----------------------------------------------------------------------------- pieces


def test_lean_adjoint_is_the_gradient_of_the_discrete_chain():
  """Eq. 5 along a base trajectory equals -λ ∂r(X_K)/∂X_0 through the Euler–Maruyama chain
  with the same noises (nonlinear base and reward, so ã varies along the path)."""
  base = toy.mixture_velocity([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.5, 0.7])
  reward = lambda x: jnp.sin(x[:, 0]) + 0.3 * jnp.sum(x**2, -1)
  sigma_fn, k, lam = flow.memoryless_sigma(0.2), 5, 1.7
  x0, key = jax.random.normal(jax.random.key(0), (5, 2)), jax.random.key(1)
  traj = flow.sample_sde(base, x0, key, num_steps=k, sigma_fn=sigma_fn)
  adj = am.lean_adjoint(base, traj, am.terminal_adjoint(reward, traj.final, lam), sigma_fn)
  assert adj.shape == (5, k + 1, 2)
  final = lambda x: flow.sample_sde(base, x, key, num_steps=k, sigma_fn=sigma_fn).final
  want0 = jax.jit(jax.grad(lambda x: -lam * jnp.sum(reward(final(x)))))(x0)
  np.testing.assert_allclose(adj[:, 0], want0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      adj[:, -1], -lam * jax.grad(lambda x: jnp.sum(reward(x)))(traj.final), rtol=1e-6
  )
  with pytest.raises(ValueError, match="terminal.shape"):
    am.lean_adjoint(base, traj, jnp.zeros((5, 3)), sigma_fn)


def test_control_is_drift_difference_over_sigma():
  """Eq. 2: κ(v_θ − v_base)/σ = (b_θ − b_base)/σ; κ = 2 for the unshifted memoryless σ."""
  x = jax.random.normal(jax.random.key(0), (6, 2))
  t = jnp.linspace(0.1, 0.9, 6)
  v_base, v = toy.gaussian_velocity(MU, S), toy.gaussian_velocity(MU + 1.0, 0.8)
  for sigma in (flow.memoryless_sigma(0.0)(t), flow.constant_sigma(0.7)(t)):
    want = (flow.drift(v, x, t, sigma) - flow.drift(v_base, x, t, sigma)) / sigma[:, None]
    np.testing.assert_allclose(
        am.control(v(x, t), v_base(x, t), x, t, sigma), want, rtol=1e-4, atol=1e-5
    )
  sigma = flow.memoryless_sigma(0.0)(t)
  np.testing.assert_allclose(
      am.control(v(x, t), v_base(x, t), x, t, sigma),
      2 * (v(x, t) - v_base(x, t)) / sigma[:, None],
      rtol=1e-4,
  )


def test_loss_matches_numpy_with_subsampling_and_clipping():
  v_base, v = toy.gaussian_velocity(MU, S), toy.gaussian_velocity(MU + 0.3, S)
  sigma_fn, k, m = flow.memoryless_sigma(0.1), 10, 4
  traj = am.sample_memoryless(
      v, jax.random.normal(jax.random.key(0), (3, 2)), jax.random.key(1), num_steps=k
  )
  adj = jax.random.normal(jax.random.key(2), traj.states.shape)
  key = jax.random.key(3)
  idx = np.asarray(am.subsample_timesteps(key, 3, k, m))
  assert idx.shape == (3, m) and idx.min() >= 0 and idx.max() < k
  assert all(len(set(row)) == m for row in idx)
  states, adj_np, times = (np.asarray(a, np.float64) for a in (traj.states, adj, traj.times))
  rows = np.repeat(np.arange(3), m)
  t = times[idx.ravel()]
  x = states[rows, idx.ravel()]
  sig = np.sqrt(2 * (1 - t + 0.1) / (t + 0.1))
  dv = np.asarray(
      v(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
      - v_base(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)),
      np.float64,
  )
  u = (1 + sig**2 * t / (2 * (1 - t)))[:, None] * dv / sig[:, None]  # eq. 2
  sq = np.sum((u + sig[:, None] * adj_np[rows, idx.ravel() + 1]) ** 2, axis=1)  # eqs. 4, 6
  clip = float(np.median(sq))
  h = 1.0 / k
  for loss_clip in (math.inf, clip):
    want = np.sum(h * np.minimum(sq, loss_clip)) * (k / m) / 3
    got, aux = am.adjoint_matching_loss(
        v, v_base, traj, adj, sigma_fn, key, num_timesteps=m, loss_clip=loss_clip
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
    np.testing.assert_allclose(float(aux["clip_fraction"]), np.mean(sq > loss_clip))
  with pytest.raises(ValueError, match="loss_clip"):
    am.adjoint_matching_loss(v, v_base, traj, adj, sigma_fn, key, loss_clip=0.0)
  with pytest.raises(ValueError, match="num_timesteps"):
    am.adjoint_matching_loss(v, v_base, traj, adj, sigma_fn, key, num_timesteps=k + 1)
  with pytest.raises(ValueError, match="key"):
    am.adjoint_matching_loss(v, v_base, traj, adj, sigma_fn, None, num_timesteps=m)


def test_loss_is_minimised_by_the_tilted_velocity():
  """On trajectories of the exact tilted model, L(v_base + a (v_tilt − v_base)) is smallest
  at a = 1: checks the 2/σ and σ factors of eq. 4 and the end-point adjoint of eq. 6."""
  v_base = toy.gaussian_velocity(MU, S)
  v_tilt = toy.gaussian_velocity(toy.tilted_gaussian(MU, S, C, LAM), S)
  k = 20
  sigma_fn = flow.memoryless_sigma(1.0 / k)
  traj = am.sample_memoryless(
      v_tilt, jax.random.normal(jax.random.key(0), (4096, 2)), jax.random.key(1), num_steps=k
  )
  adj = am.lean_adjoint(
      v_base, traj, am.terminal_adjoint(linear_reward(C), traj.final, LAM), sigma_fn
  )
  scales = np.array([0.8, 1.0, 1.2])
  losses = [
      float(
          am.adjoint_matching_loss(
              lambda x, t, a=a: v_base(x, t) + a * (v_tilt(x, t) - v_base(x, t)),
              v_base,
              traj,
              adj,
              sigma_fn,
          )[0]
      )
      for a in scales
  ]
  quad = np.polyfit(scales, losses, 2)
  a_star = -quad[1] / (2 * quad[0])
  print(f"argmin scale {a_star:.4f}, losses {losses}")
  assert abs(a_star - 1.0) < 0.03


def test_update_refuses_zero_sigma():
  base = toy.gaussian_velocity(MU, S)
  with pytest.raises(ValueError, match="sigma_fn"):
    am.make_update_fn(
        lambda p, f: base,
        lambda f: base,
        lambda f: linear_reward(C),
        optax.adam(1e-3),
        lam=1.0,
        num_steps=5,
        batch_size=4,
        shape=(2,),
        sigma_fn=flow.zero_sigma(),
    )


# ----------------------------------------------------------------------------- exact tilts


def test_gaussian_tilt_memoryless_exact_constant_sigma_biased():
  """Memoryless fine-tuning reaches N(μ + λS²c, S²I); constant σ = 0.5 falls short.

  Tolerances: 8192 samples give a mean standard error S/√8192 ≈ 0.007 per coordinate
  (0.6% of |shift| = 1.21); the K = 20 grid adds O(h) bias. We require the memoryless mean
  error below 5% of |shift| and the covariance within 6% (variance sampling error 1.6%);
  the constant-σ run must miss by more than 25% of |shift| and 5x the memoryless error.
  """
  target = toy.tilted_gaussian(MU, S, C, LAM)
  shift = np.linalg.norm(target - MU)
  errors = {}
  for name, sigma in (("memoryless", None), ("constant_0.5", 0.5)):
    x = finetune_and_sample("gauss", C, LAM, sigma=sigma)
    errors[name] = np.linalg.norm(x.mean(0) - target) / shift
    cov = np.cov(x.T)
    print(
        f"{name}: mean {x.mean(0)} target {target} rel. mean error {errors[name]:.4f} "
        f"cov {cov.ravel()}"
    )
    if name == "memoryless":
      np.testing.assert_allclose(cov, S**2 * np.eye(2), atol=0.06 * S**2)
  assert errors["memoryless"] < 0.05
  assert errors["constant_0.5"] > 0.25
  assert errors["constant_0.5"] > 5 * errors["memoryless"]
  # The bias is the initial value-function bias: with a constant σ the optimum tilts each
  # conditional law p(X_1 | X_0) = N(A X_0 + m, V I), moving the mean by λ V c with
  # V = Var(X_1 | X_0) < S² (the linear Euler chain from X_0 = 0 gives V).
  cond = flow.sample_sde(
      BASES["gauss"],
      jnp.zeros((8192, 2)),
      jax.random.key(5),
      num_steps=20,
      sigma_fn=flow.constant_sigma(0.5),
  ).final
  var = float(np.mean(np.var(np.asarray(cond, np.float64), axis=0)))
  biased = MU + LAM * var * C
  print(f"constant_0.5: Var(X_1|X_0) = {var:.4f} (S² = {S**2}), predicted mean {biased}")
  assert np.linalg.norm(x.mean(0) - biased) < 0.05 * shift


def test_mixture_tilt_mode_weights():
  """Tilted mixture weights (toy eq. 5): the mean posterior responsibility of each tilted
  component over the samples equals its weight w'_k when the samples follow the tilted law."""
  w, ss, c, lam = MIX_W, MIX_S, np.array([1.0, 0.0]), 0.5
  tw, tm = toy.tilted_mixture(w, MIX_MU, ss, c, lam)  # tw = (0.269, 0.731)

  def weights(x):
    _, log_post = toy.mixture_log_density(
        tw, tm, ss, jnp.asarray(x, jnp.float32), jnp.ones(x.shape[0])
    )
    return np.exp(np.asarray(log_post, np.float64)).mean(0)

  got = weights(finetune_and_sample("mix", c, lam, steps=400, lr=2e-3))
  print(f"mode weights: base {w}, fine-tuned {got}, target {tw}")
  # the weight must move at least 85% of the way from 0.5 to w'_2 (see the report: the K=20
  # discretisation of the nonlinear adjoint leaves a few-% shortfall), and not overshoot
  assert 0.5 + 0.85 * (tw[1] - 0.5) < got[1] < tw[1] + 0.02


def test_tilted_closed_forms_match_importance_weights():
  rng = np.random.default_rng(0)
  w, mus, ss = np.array([0.3, 0.7]), np.array([[-1.0, 0.0], [1.5, 0.5]]), np.array([0.4, 0.8])
  c, lam = np.array([0.7, -0.4]), 0.8
  comp = rng.choice(2, size=400_000, p=w)
  x = mus[comp] + ss[comp, None] * rng.normal(size=(400_000, 2))
  iw = np.exp(lam * x @ c)
  iw /= iw.sum()
  tw, tm = toy.tilted_mixture(w, mus, ss, c, lam)
  np.testing.assert_allclose([iw[comp == 0].sum(), iw[comp == 1].sum()], tw, atol=0.01)
  for k in range(2):
    mean_k = (iw[comp == k, None] * x[comp == k]).sum(0) / iw[comp == k].sum()
    np.testing.assert_allclose(mean_k, tm[k], atol=0.03)
  np.testing.assert_allclose(toy.tilted_gaussian(MU, S, C, LAM), MU + LAM * S**2 * C)


def test_velocity_mlp_starts_at_the_base():
  graphdef, params = nnx.split(toy.VelocityMLP(2, rngs=nnx.Rngs(0)))
  base = toy.gaussian_velocity(MU, S)
  x, t = jax.random.normal(jax.random.key(0), (4, 2)), jnp.linspace(0, 1, 4)
  np.testing.assert_array_equal(toy.residual_velocity(graphdef, params, base)(x, t), base(x, t))
  assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(params))


def test_finetuning_increases_a_linear_reward():
  for seed, lam, c in (
      (0, 0.5, np.array([1.0, -1.0])),
      (1, 2.0, np.array([-0.5, 1.5])),
      (2, 1.0, np.array([0.3, 0.3])),
  ):
    x = finetune_and_sample(
        "sign", c, lam, num_steps=10, steps=40, lr=2e-3, seed=seed, num_timesteps=5, n=4096
    )
    before = c @ (SIGN_W @ SIGN_MU)  # exact E_base[c·X_1]
    after = (x @ c).mean()
    # d/dλ E_λ[c·x] = Var_λ(c·x) >= min_k s_k² |c|², so the exact tilt gains at least
    # λ min_k s_k² |c|²; require half of that guaranteed gain
    floor = 0.5 * lam * SIGN_S.min() ** 2 * (c @ c)
    print(f"lam={lam} seed={seed}: reward {before:.3f} -> {after:.3f} (floor +{floor:.3f})")
    assert after > before + floor


def test_conditional_update_routes_each_rows_condition():
  """make_conditional_update_fn: class 1 is tilted by +c·x and class 0 by −c·x through ONE
  shared correction, v_θ = v_base + (2 cond − 1) MLP(x, t). Each class must reach its own
  tilted mean μ ± λS²c, which fails if any builder (sampling, adjoint, or the B·M loss rows)
  sees another row's condition."""
  base, k, steps, batch = BASES["gauss"], 20, 200, 64
  graphdef, params = nnx.split(toy.VelocityMLP(2, rngs=nnx.Rngs(0)))
  sign = lambda cond: (2.0 * cond - 1.0)[:, None]

  def vel_builder(p, frozen, cond):
    mlp = nnx.merge(graphdef, p)
    return lambda x, t: base(x, t) + sign(cond) * mlp(x, t)

  opt = optax.adam(optax.cosine_decay_schedule(1e-3, steps, 0.1))
  update = jax.jit(
      am.make_conditional_update_fn(
          vel_builder,
          lambda frozen, cond: base,
          lambda frozen, cond: (lambda x: sign(cond)[:, 0] * (x @ frozen["c"])),
          opt,
          lam=1.0,
          num_steps=k,
          shape=(2,),
          num_timesteps=10,
      ),
      donate_argnums=0,
  )
  state = TrainState.create(params, opt, jax.random.key(0))
  frozen = {"c": jnp.asarray(LAM * C, jnp.float32)}
  cond = jnp.arange(batch, dtype=jnp.int32) % 2
  for i in range(steps):
    state, metrics = update(state, frozen, jax.random.fold_in(jax.random.key(1), i), cond)
  assert np.isfinite(float(metrics["loss"]))
  n = 4096
  for c_id, direction in ((1, 1.0), (0, -1.0)):
    cond_n = jnp.full((n,), c_id, jnp.int32)
    x = am.sample_memoryless(
        vel_builder(state.params, frozen, cond_n),
        jax.random.normal(jax.random.key(7), (n, 2)),
        jax.random.key(8),
        num_steps=k,
    ).final
    target = MU + direction * LAM * S**2 * C
    err = np.linalg.norm(np.asarray(x, np.float64).mean(0) - target) / (
        LAM * S**2 * np.linalg.norm(C)
    )
    print(f"class {c_id}: mean {np.asarray(x).mean(0)} target {target} rel. err {err:.3f}")
    assert err < 0.08


def test_pytree_cond_gives_the_array_conds_update():
  """make_conditional_update_fn with cond {"ids", "extra" [B, S]} read through "ids" only, by
  guided velocities (flow.guided_velocity with a null of cond's structure) and the reward, ==
  the ids array: same loss, reward and updated parameters (the loss's B·M rows repeat every
  leaf)."""
  base, batch, extra_len = BASES["gauss"], 4, 5
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  emb = jnp.asarray(rng.normal(size=(11, 2)) * 0.5, jnp.float32)

  def ids(c):
    if isinstance(c, dict):
      assert c["extra"].shape == (c["ids"].shape[0], extra_len), c["extra"].shape
      return c["ids"]
    return c

  def velocity(p, null, cond):
    net = lambda x, tau, c: base(x, 1.0 - tau / 1000.0) + 0.3 * jnp.tanh(x * p["w"] + emb[ids(c)])
    vel = flow.guided_velocity(flow.unet_velocity(net, 1000.0), 2.0, null)
    return lambda x, t: vel(x, t, cond)

  def run(cond, null):
    update = am.make_conditional_update_fn(
        lambda p, frozen, c: velocity(p, null, c),
        lambda frozen, c: velocity({"w": jnp.zeros(2)}, null, c),
        lambda frozen, c: (lambda x: x @ frozen["c"] * (1.0 + 0.1 * ids(c))),
        optax.sgd(0.1),
        lam=1.0,
        num_steps=6,
        shape=(2,),
        num_timesteps=3,
    )
    state = TrainState.create(params, optax.sgd(0.1), jax.random.key(0))
    return jax.jit(update)(state, {"c": jnp.asarray(C, jnp.float32)}, jax.random.key(3), cond)

  class_ids = jnp.asarray([0, 3, 7, 9], jnp.int32)
  extra = jnp.arange(batch * extra_len, dtype=jnp.float32).reshape(batch, extra_len)
  state_a, m_a = run(class_ids, 10)
  state_t, m_t = run({"ids": class_ids, "extra": extra}, {"ids": 10, "extra": jnp.zeros(extra_len)})
  assert float(m_a["loss"]) > 0.0
  for name in ("loss", "reward", "grad_norm"):
    np.testing.assert_allclose(m_t[name], m_a[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(state_t.params["w"], state_a.params["w"], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(state_a.params["w"]) != np.asarray(params["w"]))
