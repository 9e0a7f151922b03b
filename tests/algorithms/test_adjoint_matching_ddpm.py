"""Adjoint Matching on the DDPM chain: adjoint vs autodiff, the loss re-derived, exact tilts.

Exact target: for data N(m, s² I) the DDPM ε-model is known in closed form,

  x_t ~ N(√ᾱ m, (ᾱ s² + 1 − ᾱ) I)   ⇒   ε*(x, t) = √(1 − ᾱ)(x − √ᾱ m) / (ᾱ s² + 1 − ᾱ),

and with it the DDPM chain (eta = 1) is linear-Gaussian: μ(x, k) = A_k x + b_k. Its terminal
law is N(m_K, v_K I) with v_K → s² as K → ∞ (v_K < s² for finite K: DDPM's kernel leaves out
Var(x_0 | x_t)). For r(x) = c·x the optimum of the discrete problem (module eq. 3) with the
initial law fixed at N(0, I) tilts each conditional law p(X_K | X_0) = N(A X_0 + m', V I),
so the fine-tuned mean is m_K + λ V c with V = Var(X_K | X_0) = Σ_k (Π_{j>k} A_j)² σ_k²,
propagated here independently of the algorithm; memorylessness makes V ≈ v_K ≈ s².
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax.algorithms import adjoint_matching_ddpm as amd
from alignjax.diffusion import samplers, schedules
from alignjax.models import toy
from alignjax.training import TrainState

SCHEDULE = schedules.make_schedule("linear")
MU, S = np.array([0.5, -0.5]), 0.6
C, LAM = np.array([1.0, 0.5]), 3.0  # λ s² c = (1.08, 0.54), |shift| = 1.21


def abar(t):
  return schedules.alpha_cumprod_at(SCHEDULE, t)


def gaussian_eps(mean, std):
  """ε*(x, t) of the module docstring for data N(mean, std² I); cond is ignored."""
  mean = jnp.asarray(mean, jnp.float32)

  def eps_fn(x, t, cond):
    a = abar(t)[:, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mean) / (a * std**2 + 1 - a)

  return eps_fn


def mixture_eps(weights, means, stds):
  """ε* = −√(1 − ᾱ) ∇ log p_t for data Σ_k w_k N(μ_k, s_k² I) (a nonlinear base)."""
  w, mus, ss = (jnp.asarray(a, jnp.float32) for a in (weights, means, stds))

  def log_p(x, a):  # one example x [D], ᾱ scalar
    var = a * ss**2 + 1 - a
    d = x[None] - jnp.sqrt(a) * mus
    return jax.nn.logsumexp(
        jnp.log(w) - 0.5 * jnp.sum(d**2, -1) / var - 0.5 * x.shape[0] * jnp.log(var)
    )

  def eps_fn(x, t, cond):
    a = abar(t)
    return -jnp.sqrt(1 - a)[:, None] * jax.vmap(jax.grad(log_p))(x, a)

  return eps_fn


def linear_reward(c):
  c = jnp.asarray(c, jnp.float32)
  return lambda x, cond: x @ c


def residual_eps(graphdef, params, base):
  """ε_θ(x, t, c) = ε_base(x, t, c) + MLP(x, t / N): starts exactly at the base."""
  mlp = nnx.merge(graphdef, params)
  return lambda x, t, cond: base(x, t, cond) + mlp(x, t.astype(jnp.float32) / 1000.0)


def chain_moments(eps_fn, num_steps):
  """(m_K, v_K, V = Var(X_K | X_0)) of a linear-Gaussian chain by moment propagation (float64)."""
  ts = schedules.inference_timesteps(1000, num_steps)
  ps = schedules.inference_prev_timesteps(1000, num_steps)
  m, v, v_cond = np.zeros(2), 1.0, 0.0
  cond = jnp.zeros((1,), jnp.int32)
  for t, p in zip(ts, ps):
    t, p = jnp.full((1,), t), jnp.full((1,), p)
    mean = lambda x: np.asarray(
        amd.step_mean(eps_fn, SCHEDULE, jnp.asarray(x, jnp.float32), t, p, cond), np.float64
    )[0]
    b = mean(np.zeros((1, 2)))
    a = mean(np.ones((1, 2)))[0] - b[0]  # isotropic: one slope per step
    sd = float(samplers.ddim_std(SCHEDULE, t, p, 1.0)[0])
    m, v, v_cond = a * m + b, a * a * v + sd * sd, a * a * v_cond + sd * sd
  return m, v, v_cond


@functools.lru_cache(maxsize=None)
def _compiled(base_name, num_steps, batch, num_timesteps, lr, steps):
  base = {
      "gauss": gaussian_eps(MU, S),
      "mix": mixture_eps([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [0.5, 0.6]),
  }[base_name]
  graphdef, _ = nnx.split(toy.VelocityMLP(2, rngs=nnx.Rngs(0)))
  builder = lambda p, frozen: residual_eps(graphdef, p, base)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))
  update = jax.jit(
      amd.make_update_fn(
          builder,
          lambda frozen: base,
          lambda frozen: linear_reward(frozen["c"]),
          SCHEDULE,
          opt,
          lam=1.0,
          num_steps=num_steps,
          shape=(2,),
          num_timesteps=num_timesteps,
      ),
      donate_argnums=0,
  )
  sample = jax.jit(
      lambda p, cond, key: amd.sample_chain(
          builder(p, {}), SCHEDULE, cond, key, shape=(2,), num_steps=num_steps
      ).final
  )
  return update, sample, opt


def finetune_and_sample(
    base_name, c, lam, *, num_steps, steps=200, batch=64, num_timesteps=10, lr=1e-3, seed=0, n=8192
):
  """AM with r = c·x (λ and c enter as frozen["c"] = λ c), then n fine-tuned samples [n, 2]."""
  update, sample, opt = _compiled(base_name, num_steps, batch, num_timesteps, lr, steps)
  _, params = nnx.split(toy.VelocityMLP(2, rngs=nnx.Rngs(seed)))
  state = TrainState.create(params, opt, jax.random.key(seed))
  frozen = {"c": jnp.asarray(lam * np.asarray(c), jnp.float32)}
  key, cond = jax.random.key(100 + seed), jnp.zeros((batch,), jnp.int32)
  for i in range(steps):
    state, metrics = update(state, frozen, jax.random.fold_in(key, i), cond)
  assert int(state.step) == steps and np.isfinite(float(metrics["loss"]))
  x = sample(state.params, jnp.zeros((n,), jnp.int32), jax.random.key(seed + 8))
  return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("clip_sample", [None, 1.0])
def test_lean_adjoint_is_the_gradient_of_the_discrete_chain(clip_sample):
  """Eq. 5 along a base trajectory equals −λ ∂r(X_K)/∂X_0 through the chain (same noises);
  nonlinear base and reward, and the clipped x̂_0 as part of μ."""
  base = mixture_eps([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.5, 0.7])
  reward = lambda x, cond: jnp.sin(x[:, 0]) + 0.3 * jnp.sum(x**2, -1) * (cond + 1)
  k, lam, key = 6, 1.7, jax.random.key(1)
  cond = jnp.array([0, 1, 0, 1, 2], jnp.int32)
  x_init = 1.5 * jax.random.normal(jax.random.key(0), (5, 2))
  final = lambda x: samplers.sample(
      base,
      SCHEDULE,
      cond,
      key,
      shape=(2,),
      num_steps=k,
      eta=1.0,
      clip_sample=clip_sample,
      initial_latents=x,
  ).final
  traj = samplers.sample(
      base,
      SCHEDULE,
      cond,
      key,
      shape=(2,),
      num_steps=k,
      eta=1.0,
      clip_sample=clip_sample,
      initial_latents=x_init,
  )
  terminal = amd.terminal_adjoint(reward, traj.final, cond, lam)
  adj = amd.lean_adjoint(base, SCHEDULE, traj, terminal, clip_sample=clip_sample)
  assert adj.shape == (5, k + 1, 2)
  want0 = jax.jit(jax.grad(lambda x: -lam * jnp.sum(reward(final(x), cond))))(x_init)
  np.testing.assert_allclose(adj[:, 0], want0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      terminal,
      -lam
      * (
          jnp.cos(traj.final[:, 0])[:, None] * jnp.array([1.0, 0.0])
          + 0.6 * traj.final * (cond + 1)[:, None]
      ),
      rtol=1e-5,
      atol=1e-6,
  )
  with pytest.raises(ValueError, match="terminal.shape"):
    amd.lean_adjoint(base, SCHEDULE, traj, jnp.zeros((5, 3)))


def _np_mean_std(eps, x, t, p):
  """Samplers eqs. 1-3 re-derived in float64 numpy (no clipping), eta = 1."""
  ab = lambda s: np.where(
      s >= 0, np.asarray(SCHEDULE.alphas_cumprod, np.float64)[np.clip(s, 0, 999)], 1.0
  )[:, None]
  at, as_ = ab(t), ab(p)
  x0 = (x - np.sqrt(1 - at) * eps) / np.sqrt(at)
  var = (1 - as_) / (1 - at) * (1 - at / as_)
  return np.sqrt(as_) * x0 + np.sqrt(np.maximum(1 - as_ - var, 0)) * eps, np.sqrt(var[:, 0])


def test_loss_matches_numpy_with_subsampling_clipping_and_the_deterministic_step():
  base, fine = gaussian_eps(MU, S), gaussian_eps(MU + 0.4, 0.8)
  k, m, batch = 5, 3, 4
  cond = jnp.zeros((batch,), jnp.int32)
  traj = amd.sample_chain(fine, SCHEDULE, cond, jax.random.key(1), shape=(2,), num_steps=k)
  adj = jax.random.normal(jax.random.key(2), traj.latents.shape)
  key = jax.random.key(3)
  idx = np.asarray(amd.subsample_timesteps(key, batch, k, m))
  rows = np.repeat(np.arange(batch), m)
  lat, adj_np = np.asarray(traj.latents, np.float64), np.asarray(adj, np.float64)
  x = lat[rows, idx.ravel()]
  t = np.asarray(traj.timesteps)[idx.ravel()]
  p = np.asarray(traj.prev_timesteps)[idx.ravel()]
  assert p.min() < 0, "the subsample should include the deterministic last step"
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  eps_t = np.asarray(fine(f32(x), jnp.asarray(t), None), np.float64)
  eps_b = np.asarray(base(f32(x), jnp.asarray(t), None), np.float64)
  mu_t, sd = _np_mean_std(eps_t, x, t, p)
  mu_b, _ = _np_mean_std(eps_b, x, t, p)
  live = sd > 0
  assert not live.all() and live.any()
  sd_safe = np.where(live, sd, 1.0)[:, None]
  sq = np.sum(((mu_t - mu_b) / sd_safe + sd_safe * adj_np[rows, idx.ravel() + 1]) ** 2, 1)
  clip = float(np.median(sq[live]))
  for loss_clip in (math.inf, clip):
    want = np.sum(np.where(live, np.minimum(sq, loss_clip), 0)) * (k / m) / batch  # eq. 8
    got, aux = amd.adjoint_matching_loss(
        fine, base, SCHEDULE, traj, adj, key, num_timesteps=m, loss_clip=loss_clip
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
    np.testing.assert_allclose(
        float(aux["clip_fraction"]), np.sum(live & (sq > loss_clip)) / live.sum()
    )
  with pytest.raises(ValueError, match="loss_clip"):
    amd.adjoint_matching_loss(fine, base, SCHEDULE, traj, adj, key, loss_clip=0.0)
  with pytest.raises(ValueError, match="num_timesteps"):
    amd.adjoint_matching_loss(fine, base, SCHEDULE, traj, adj, key, num_timesteps=k + 1)
  with pytest.raises(ValueError, match="key"):
    amd.adjoint_matching_loss(fine, base, SCHEDULE, traj, adj, None, num_timesteps=m)
  with pytest.raises(ValueError, match="eta"):
    amd.adjoint_matching_loss(fine, base, SCHEDULE, traj, adj, key, eta=0.0)


def test_control_is_the_eps_difference_scaled_by_c_over_sigma():
  """Eq. 7: without clipping u = c_k (ε_θ − ε_base)/σ_k with the closed-form c_k."""
  base, fine = gaussian_eps(MU, S), gaussian_eps(MU - 0.3, 0.5)
  x = jax.random.normal(jax.random.key(0), (6, 2))
  t = jnp.array([980, 700, 500, 300, 100, 20])
  p = t - 20
  cond = jnp.zeros((6,), jnp.int32)
  sd = samplers.ddim_std(SCHEDULE, t, p, 1.0)
  u = amd.control(
      amd.step_mean(fine, SCHEDULE, x, t, p, cond), amd.step_mean(base, SCHEDULE, x, t, p, cond), sd
  )
  at, as_ = np.asarray(abar(t), np.float64), np.asarray(abar(p), np.float64)
  ck = np.sqrt(1 - as_ - np.asarray(sd, np.float64) ** 2) - np.sqrt(as_ * (1 - at) / at)
  want = (ck / np.asarray(sd, np.float64))[:, None] * np.asarray(
      fine(x, t, cond) - base(x, t, cond), np.float64
  )
  np.testing.assert_allclose(np.asarray(u), want, rtol=2e-3, atol=1e-4)


def test_update_refuses_bad_eta():
  base = gaussian_eps(MU, S)
  for eta in (0.0, 1.5):
    with pytest.raises(ValueError, match="eta"):
      amd.make_update_fn(
          lambda p, f: base,
          lambda f: base,
          lambda f: linear_reward(C),
          SCHEDULE,
          optax.adam(1e-3),
          lam=1.0,
          num_steps=5,
          shape=(2,),
          eta=eta,
      )


def test_eps_star_is_the_noise_regression_optimum():
  """The closed-form ε* used below minimises E‖ε − ε(x_t, t)‖² (checked by regression)."""
  rng = np.random.default_rng(0)
  t = 400
  x0 = MU + S * rng.normal(size=(200_000, 2))
  noise = rng.normal(size=x0.shape)
  a = float(abar(jnp.array(t)))
  xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  design = np.concatenate([xt, np.ones((len(xt), 1))], 1)
  coef, *_ = np.linalg.lstsq(design, noise, rcond=None)  # E[ε | x_t] is affine in x_t
  got = np.asarray(gaussian_eps(MU, S)(jnp.asarray(xt[:5], jnp.float32), jnp.full((5,), t), None))
  np.testing.assert_allclose(got, design[:5] @ coef, atol=0.02)


# ----------------------------------------------------------------------------- exact tilts


def test_gaussian_tilt_reaches_the_tilted_mean():
  """AM on ε_θ = ε* + zero-initialised MLP reaches m_K + λ V c (see module docstring).

  K = 100 steps: the chain's Var(X_K | X_0) is V = 0.321 (s² = 0.36, the gap is the O(1/K)
  variance deficit of DDPM's kernel; V → s² as K grows). Tolerances: 8192 samples give a
  standard error √V/√8192 ≈ 0.006 per coordinate (0.5% of |shift|); we require the error to
  the exact discrete target below 5% of |λ V c| and to m + λ s² c below the V-gap plus 5%.
  """
  k = 100
  m_k, v_k, v_cond = chain_moments(gaussian_eps(MU, S), k)
  print(f"K={k}: base chain m_K={m_k}, v_K={v_k:.4f}, V={v_cond:.4f}, s²={S**2}")
  target = m_k + LAM * v_cond * C
  ideal = MU + LAM * S**2 * C
  x = finetune_and_sample("gauss", C, LAM, num_steps=k, lr=3e-3)
  err = np.linalg.norm(x.mean(0) - target) / np.linalg.norm(LAM * v_cond * C)
  cov = np.cov(x.T)
  print(
      f"fine-tuned mean {x.mean(0)}, discrete target {target}, ideal {ideal}, rel. err "
      f"{err:.4f}, cov {cov.ravel()}"
  )
  assert err < 0.05
  gap = np.linalg.norm(LAM * (S**2 - v_cond) * C)
  assert np.linalg.norm(x.mean(0) - ideal) < gap + 0.05 * np.linalg.norm(ideal - MU)
  np.testing.assert_allclose(cov, v_k * np.eye(2), atol=0.08 * v_k)


def test_finetuning_increases_a_linear_reward():
  for seed, lam, c in ((0, 0.5, np.array([1.0, -1.0])), (1, 2.0, np.array([-0.5, 1.5]))):
    x = finetune_and_sample(
        "mix", c, lam, num_steps=20, steps=60, lr=2e-3, seed=seed, num_timesteps=5, n=4096
    )
    base = np.asarray(
        _compiled("mix", 20, 64, 5, 2e-3, 60)[1](
            nnx.split(toy.VelocityMLP(2, rngs=nnx.Rngs(0)))[1],
            jnp.zeros((4096,), jnp.int32),
            jax.random.key(seed + 8),
        ),
        np.float64,
    )
    before, after = (base @ c).mean(), (x @ c).mean()
    # d/dλ E_λ[c·x] = Var_λ(c·x) >= (min_k s_k² − the chain's deficit) |c|²; require a
    # quarter of λ min_k s_k² |c|²
    floor = 0.25 * lam * 0.5**2 * (c @ c)
    print(f"lam={lam} seed={seed}: reward {before:.3f} -> {after:.3f} (floor +{floor:.3f})")
    assert after > before + floor


def test_pytree_cond_gives_the_array_conds_update():
  """cond {"ids", "extra" [B, S]} read through "ids" only (by the guided ε-models, with a null
  condition of the same structure, and by the reward) == the ids array: same loss, reward
  and updated parameters, with timestep subsampling (the loss repeats every leaf M times)."""
  base, batch, extra_len = gaussian_eps(MU, S), 4, 5
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  emb = jnp.asarray(rng.normal(size=(11, 2)) * 0.5, jnp.float32)

  def ids(c):
    if isinstance(c, dict):
      assert c["extra"].shape == (c["ids"].shape[0], extra_len), c["extra"].shape
      return c["ids"]
    return c

  def eps_builder(p, frozen, null):
    eps = lambda x, t, c: base(x, t, c) + 0.3 * jnp.tanh(x * p["w"] + emb[ids(c)])
    return samplers.classifier_free_guidance(eps, 2.0, null)

  def run(cond, null):
    base_builder = lambda frozen: samplers.classifier_free_guidance(
        lambda x, t, c: base(x, t, c) + 0.3 * jnp.tanh(emb[ids(c)]), 2.0, null
    )
    update = amd.make_update_fn(
        lambda p, frozen: eps_builder(p, frozen, null),
        base_builder,
        lambda frozen: (lambda x, c: x @ frozen["c"] * (1.0 + 0.1 * ids(c))),
        SCHEDULE,
        optax.sgd(0.1),
        lam=1.0,
        num_steps=6,
        shape=(2,),
        num_timesteps=3,
    )
    state = TrainState.create(params, optax.sgd(0.1), jax.random.key(0))
    frozen = {"c": jnp.asarray(C, jnp.float32)}
    return jax.jit(update)(state, frozen, jax.random.key(3), cond)

  class_ids = jnp.asarray([0, 3, 7, 9], jnp.int32)
  extra = jnp.arange(batch * extra_len, dtype=jnp.float32).reshape(batch, extra_len)
  state_a, m_a = run(class_ids, 10)
  state_t, m_t = run({"ids": class_ids, "extra": extra}, {"ids": 10, "extra": jnp.zeros(extra_len)})
  assert float(m_a["loss"]) > 0.0
  for name in ("loss", "reward", "grad_norm"):
    np.testing.assert_allclose(m_t[name], m_a[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(state_t.params["w"], state_a.params["w"], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(state_a.params["w"]) != np.asarray(params["w"]))


# ----------------------------------------------------------------------------- microbatches


def _microbatch_update(num_microbatches, loss_clip=math.inf):
  """One jitted SGD update (SGD: the parameter change is −lr × the gradient, unnormalised) of
  ε_base + MLP on a nonlinear base, B = 4 chains of K = 6 steps, M = 3: B·M = 12 pairs."""
  base = mixture_eps([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [0.5, 0.6])
  graphdef, params = nnx.split(toy.VelocityMLP(2, hidden=16, rngs=nnx.Rngs(0)))
  # perturbed off its zero output layer, so that u_k != 0 and every layer gets a gradient
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = tree.unflatten(
      [leaf + 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
  )
  opt = optax.sgd(0.1)
  update = amd.make_update_fn(
      lambda p, frozen: residual_eps(graphdef, p, base),
      lambda frozen: base,
      lambda frozen: linear_reward(frozen["c"]),
      SCHEDULE,
      opt,
      lam=1.0,
      num_steps=6,
      shape=(2,),
      num_timesteps=3,
      loss_clip=loss_clip,
      num_microbatches=num_microbatches,
  )
  state = TrainState.create(params, opt, jax.random.key(0))
  cond = jnp.zeros((4,), jnp.int32)
  new, metrics = jax.jit(update)(state, {"c": jnp.asarray(C, jnp.float32)}, jax.random.key(5), cond)
  change = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), new.params, params)
  return change, {k: float(v) for k, v in metrics.items()}


def test_microbatched_update_equals_the_unchunked_one():
  """Eq. 9: chunks of 6 and of 1 pair(s) give the parameter change (−lr ∇L) and every metric
  of the single-batch update, with a clip that cuts some of the pairs."""
  clip = 3.0  # about the mean squared residual (3.3): clips the larger terms
  want, want_metrics = _microbatch_update(1, clip)
  assert 0 < want_metrics["clip_fraction"] < 1, want_metrics
  assert all(np.any(leaf != 0) for leaf in jax.tree_util.tree_leaves(want))
  for n in (2, 12):
    got, got_metrics = _microbatch_update(n, clip)
    diff = max(
        float(np.max(np.abs(g - w)))
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))
    )
    print(f"num_microbatches={n}: max |Δ(new − initial)| = {diff:.3g}")
    jax.tree_util.tree_map(
        lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want
    )
    for name, value in want_metrics.items():
      np.testing.assert_allclose(got_metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_num_microbatches_must_be_an_int_dividing_the_pairs():
  with pytest.raises(ValueError, match=r"num_microbatches=5: must divide the B\*M = 4\*3 = 12"):
    _microbatch_update(5)
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="num_microbatches"):
      amd.make_update_fn(
          lambda p, f: None,
          lambda f: None,
          lambda f: None,
          SCHEDULE,
          optax.sgd(0.1),
          lam=1.0,
          num_steps=5,
          shape=(2,),
          num_microbatches=bad,
      )
