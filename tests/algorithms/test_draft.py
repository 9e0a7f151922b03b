"""DRaFT against a numpy re-derivation, exact truncation zeros, finite differences, memory of
per-step checkpointing, DRaFT-LV's variance, and a reward-increasing sign test."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import training
from alignjax.algorithms import draft
from alignjax.diffusion import schedules
from alignjax.rewards import brightness, jpeg_compressibility

N_TRAIN = 20
SCHEDULE = schedules.make_schedule("linear", N_TRAIN, beta_start=0.05, beta_end=0.3)
ABAR = np.asarray(SCHEDULE.alphas_cumprod, np.float64)


class ConvEps(nnx.Module):
  """A small conditional conv net eps(x, t, c) whose activations dominate its memory."""

  def __init__(self, channels: int, num_timesteps: int, *, rngs: nnx.Rngs):
    self.conv_in = nnx.Conv(1, channels, (3, 3), rngs=rngs)
    self.t_embed = nnx.Embed(num_timesteps, channels, rngs=rngs)
    self.c_embed = nnx.Embed(11, channels, rngs=rngs)
    self.conv_mid = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
    self.conv_out = nnx.Conv(channels, 1, (3, 3), rngs=rngs)

  def __call__(self, x, t, c):
    h = self.conv_in(x) + (self.t_embed(t) + self.c_embed(c))[:, None, None, :]
    h = self.conv_mid(jax.nn.silu(h))
    return self.conv_out(jax.nn.silu(h))


def conv_model(channels=8, seed=0, num_timesteps=N_TRAIN):
  graphdef, params = nnx.split(ConvEps(channels, num_timesteps, rngs=nnx.Rngs(seed)))

  def builder(trainable, frozen, mode="full"):
    model = nnx.merge(graphdef, training.Finetune(mode, lora_rank=2).params(trainable, frozen))
    return lambda x, t, c: model(x, t, c)

  return params, builder


def per_step_builder(trainable, frozen):
  """eps = tanh(w[t] x + b[t]): one parameter pair per training timestep."""
  del frozen
  return lambda x, t, c: jnp.tanh(
      trainable["w"][t][:, None, None, None] * x + trainable["b"][t][:, None, None, None]
  )


def per_step_params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
      "w": jnp.asarray(rng.normal(size=N_TRAIN) * 0.5, dtype),
      "b": jnp.asarray(rng.normal(size=N_TRAIN) * 0.3, dtype),
  }


def jitted_gradient(**options):
  """jax.jit(reward_gradient) of (trainable, cond, key) with frozen = {}."""
  return jax.jit(lambda p, c, k: draft.reward_gradient(p, {}, c, k, **options))


def mean_reward(images, prompts):
  del prompts
  return jnp.mean(images, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- forward value


def test_loss_matches_a_numpy_ddim_chain_with_penalty():
  """Eqs. 1, 2, 5 re-derived in numpy for the per-step model (eta = 0, T = 4, K = 2)."""
  params, base = per_step_params(0), per_step_params(1)
  x_init = np.random.default_rng(2).normal(size=(3, 2, 2, 1)) * 0.5
  ts = schedules.inference_timesteps(N_TRAIN, 4)
  prevs = schedules.inference_prev_timesteps(N_TRAIN, 4)
  eps_np = lambda p, x, t: np.tanh(float(p["w"][t]) * x + float(p["b"][t]))
  x, penalties = x_init, []
  for i, (t, s) in enumerate(zip(ts, prevs)):
    eps = eps_np(params, x, t)
    if i >= 2:  # the last K = 2 steps enter the penalty
      penalties.append(np.mean((eps - eps_np(base, x, t)) ** 2))
    a_t, a_s = ABAR[t], (ABAR[s] if s >= 0 else 1.0)
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps
  reward = np.clip((x + 1) / 2, 0, 1).mean(axis=(1, 2, 3))
  expected = -1.5 * reward.mean() + 0.7 * np.mean(penalties)

  loss, aux = draft.draft_loss(
      params,
      {},
      jnp.zeros(3, jnp.int32),
      jax.random.key(0),
      eps_fn_builder=per_step_builder,
      schedule=SCHEDULE,
      reward_fn=brightness(),
      num_steps=4,
      truncation_k=2,
      shape=(2, 2, 1),
      reward_scale=1.5,
      kl_weight=0.7,
      base_eps_fn_builder=lambda f: per_step_builder(base, f),
      initial_latents=jnp.asarray(x_init, jnp.float32),
  )
  np.testing.assert_allclose(loss, expected, rtol=2e-5)
  np.testing.assert_allclose(aux["reward_mean"], reward.mean(), rtol=2e-5)
  np.testing.assert_allclose(aux["kl_penalty"], np.mean(penalties), rtol=2e-5)
  np.testing.assert_allclose(aux["samples"], x, rtol=2e-5, atol=1e-6)


def test_lv_reports_the_chain_samples_not_the_re_denoised_ones():
  """DRaFT-LV's "samples" are the chain's x_T: the same as full DRaFT's for the same key."""
  options = dict(
      eps_fn_builder=per_step_builder,
      schedule=SCHEDULE,
      reward_fn=mean_reward,
      num_steps=4,
      eta=0.5,
      shape=(2, 2, 1),
  )
  cond, key = jnp.arange(3, dtype=jnp.int32), jax.random.key(4)
  _, full = draft.draft_loss(per_step_params(0), {}, cond, key, **options)
  _, lv = draft.draft_loss(per_step_params(0), {}, cond, key, lv_samples=2, **options)
  assert lv["samples"].shape == (3, 2, 2, 1)
  np.testing.assert_allclose(lv["samples"], full["samples"], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("k,lv", [(None, 0), (1, 0), (3, 0), (None, 2)])
def test_gradient_is_exactly_zero_before_the_truncation_point(k, lv):
  params = per_step_params(0)
  ts = schedules.inference_timesteps(N_TRAIN, 5)
  grads, _ = jitted_gradient(
      eps_fn_builder=per_step_builder,
      schedule=SCHEDULE,
      reward_fn=mean_reward,
      num_steps=5,
      truncation_k=k,
      lv_samples=lv,
      eta=0.5,
      shape=(3, 3, 1),
      kl_weight=0.1,
      base_eps_fn_builder=lambda f: per_step_builder(per_step_params(1), f),
  )(params, jnp.arange(4, dtype=jnp.int32), jax.random.key(1))
  n_grad = 5 if k is None and lv == 0 else (k or 1)
  for name in ("w", "b"):
    g = np.asarray(grads[name])
    assert np.all(g[ts[-n_grad:]] != 0.0), (name, g)
    untouched = np.setdiff1d(np.arange(N_TRAIN), ts[-n_grad:])
    np.testing.assert_array_equal(g[untouched], 0.0)  # exactly zero, eq. 3


# ----------------------------------------------------------------------------- finite differences


def _mlp_builder(trainable, frozen):
  """A smooth tiny conditional MLP eps over 2x2x1 samples (float64 in the FD test)."""
  del frozen

  def eps_fn(x, t, c):
    h = x.reshape(x.shape[0], -1) @ trainable["w1"] + trainable["temb"][t] + trainable["cemb"][c]
    return (jnp.tanh(h) @ trainable["w2"]).reshape(x.shape)

  return eps_fn


def _mlp_params(rng, dtype):
  shapes = {"w1": (4, 6), "temb": (N_TRAIN, 6), "cemb": (11, 6), "w2": (6, 4)}
  return {k: jnp.asarray(rng.normal(size=s) * 0.5, dtype) for k, s in shapes.items()}


def test_gradient_matches_central_finite_differences_in_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    params, base, direction = (_mlp_params(rng, jnp.float64) for _ in range(3))
    options = dict(
        eps_fn_builder=_mlp_builder,
        schedule=SCHEDULE,
        reward_fn=lambda im, c: jnp.mean(jnp.sin(3.0 * im), axis=(1, 2, 3)),
        num_steps=3,
        eta=0.6,
        guidance_scale=2.0,
        null_cond=10,
        shape=(2, 2, 1),
        kl_weight=0.3,
        base_eps_fn_builder=lambda f: _mlp_builder(base, f),
        initial_latents=jnp.asarray(rng.normal(size=(3, 2, 2, 1)) * 0.3, jnp.float64),
    )
    cond, key = jnp.array([0, 4, 10], jnp.int32), jax.random.key(5)
    loss_fn = jax.jit(lambda p: draft.draft_loss(p, {}, cond, key, **options)[0])
    grads, _ = jitted_gradient(**options)(params, cond, key)
    assert grads["w1"].dtype == jnp.float64
    h = 1e-5
    shifted = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * d, params, direction)
    fd = (loss_fn(shifted(h)) - loss_fn(shifted(-h))) / (2 * h)
    analytic = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction))
    )
    print(f"finite differences {float(fd):.12g} vs gradient {float(analytic):.12g}")
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_truncated_gradient_equals_full_gradient_of_the_last_k_steps_parameters():
  """With per-step parameters, w[t] of the last K steps only act in those steps: DRaFT-K's
  gradient for them is the full (untruncated) derivative, checked by finite differences."""
  with jax.enable_x64(True):
    params = per_step_params(0, jnp.float64)
    options = dict(
        eps_fn_builder=per_step_builder,
        schedule=SCHEDULE,
        reward_fn=mean_reward,
        num_steps=5,
        eta=0.3,
        shape=(3, 3, 1),
        remat_policy="dots_saveable",
        initial_latents=jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 3, 1))),
    )
    cond, key = jnp.arange(4, dtype=jnp.int32), jax.random.key(2)
    ts = schedules.inference_timesteps(N_TRAIN, 5)
    truncated, _ = jitted_gradient(truncation_k=2, **options)(params, cond, key)
    loss_fn = jax.jit(lambda p: draft.draft_loss(p, {}, cond, key, **options)[0])
    for t in ts[-2:]:
      h = 1e-5
      bump = lambda s: {**params, "w": params["w"].at[t].add(s)}
      fd = (loss_fn(bump(h)) - loss_fn(bump(-h))) / (2 * h)
      np.testing.assert_allclose(truncated["w"][t], fd, rtol=1e-6)


# ----------------------------------------------------------------------------- remat and memory


def test_remat_policies_give_the_same_gradient_and_unknown_names_are_refused():
  params = per_step_params(0)
  options = dict(
      eps_fn_builder=per_step_builder,
      schedule=SCHEDULE,
      reward_fn=brightness(),
      num_steps=3,
      eta=0.4,
      shape=(4, 4, 1),
      kl_weight=0.2,
      base_eps_fn_builder=lambda f: per_step_builder(per_step_params(1), f),
  )
  cond, key = jnp.array([1, 10], jnp.int32), jax.random.key(0)
  reference, _ = jitted_gradient(remat_policy="none", **options)(params, cond, key)
  grads, _ = jitted_gradient(remat_policy="full", **options)(params, cond, key)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, reference
  )
  with pytest.raises(ValueError, match="remat_policy='offload'.*dots_saveable.*full.*none"):
    draft.reward_gradient(params, {}, cond, key, remat_policy="offload", **options)


@pytest.mark.slow
def test_per_step_checkpointing_bounds_the_memory_of_full_reward_backpropagation():
  """temp bytes of the compiled full-chain gradient (16 samples, 8x8, 32 channels)."""
  params, builder = conv_model(32, num_timesteps=40)
  schedule = schedules.make_schedule("linear", 40)
  cond = jnp.zeros((16,), jnp.int32)
  temp = {}
  for policy in ("none", "full"):
    for steps in (10, 40):
      fn = jitted_gradient(
          eps_fn_builder=builder,
          schedule=schedule,
          reward_fn=brightness(),
          num_steps=steps,
          shape=(8, 8, 1),
          remat_policy=policy,
      )
      compiled = fn.lower(params, cond, jax.random.key(0)).compile()
      temp[policy, steps] = compiled.memory_analysis().temp_size_in_bytes
  print(
      "DRaFT full-chain gradient temp bytes: "
      + ", ".join(f"remat={p} T={t}: {v}" for (p, t), v in temp.items())
  )
  assert temp["full", 40] < 2 * temp["full", 10]
  assert temp["none", 40] > 2.5 * temp["none", 10]
  assert temp["full", 40] < temp["none", 40] / 4


# ----------------------------------------------------------------------------- DRaFT-LV variance


@pytest.mark.slow
def test_lv_gradient_has_lower_variance_than_draft_1_over_seeds():
  """64 seeds, B = 4 chains of T = 4 steps each for both estimators (the paper's cost model:
  the chain dominates; DRaFT-LV adds n one-step denoisings and rewards per chain)."""
  params = per_step_params(0)
  cond = jnp.arange(4, dtype=jnp.int32)
  reward = lambda images, prompts: jnp.mean(jnp.sin(4.0 * images), axis=(1, 2, 3))

  def variance(**kw):
    grad = lambda k: jax.flatten_util.ravel_pytree(
        draft.reward_gradient(
            params,
            {},
            cond,
            k,
            eps_fn_builder=per_step_builder,
            schedule=SCHEDULE,
            reward_fn=reward,
            num_steps=4,
            shape=(4, 4, 1),
            **kw,
        )[0]
    )[0]
    grads = jax.jit(jax.vmap(grad))(jax.random.split(jax.random.key(0), 64))
    return float(jnp.sum(jnp.var(grads, axis=0)))  # trace of the covariance

  draft_1, lv_1, lv_8 = (variance(truncation_k=1), variance(lv_samples=1), variance(lv_samples=8))
  print(
      f"gradient variance: DRaFT-1 {draft_1:.4g}, DRaFT-LV n=1 {lv_1:.4g}, n=8 {lv_8:.4g}; "
      f"LV(8)/DRaFT-1 = {lv_8 / draft_1:.3f}"
  )
  assert lv_8 < draft_1
  assert lv_8 < lv_1  # the n re-noisings are independent: their average has less variance


# ----------------------------------------------------------------------------- updates


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_few_updates_increase_brightness(mode):
  base, builder = conv_model(8)
  trainable, frozen = training.Finetune(mode, lora_rank=2).split(base, jax.random.key(3))
  optimizer = optax.adam(3e-2)
  gentle = schedules.make_schedule("linear", N_TRAIN, beta_start=1e-3, beta_end=0.02)
  update = jax.jit(
      draft.make_update_fn(
          functools.partial(builder, mode=mode),
          gentle,
          brightness(),
          optimizer,
          num_steps=3,
          truncation_k=2,
          guidance_scale=2.0,
          null_cond=10,
          shape=(4, 4, 1),
          remat_policy="full",
      )
  )
  state = training.TrainState.create(trainable, optimizer, jax.random.key(0))
  cond, key = jnp.arange(8, dtype=jnp.int32), jax.random.key(7)
  rewards = []
  for _ in range(6):  # the same key: the same x_T, so the reward change is the parameters'
    state, metrics = update(state, frozen, cond, key)
    rewards.append(float(metrics["reward_mean"]))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  print(mode, "brightness per update:", np.round(rewards, 4))
  assert rewards[-1] > rewards[0] + 0.01
  assert int(state.step) == 6
  if mode == "lora":
    assert set(state.params) == set(trainable) and set(state.params) != set()
    assert all("a" in v and "b" in v for v in state.params.values())


def test_reward_scale_scales_the_gradient():
  params = per_step_params(0)
  options = dict(
      eps_fn_builder=per_step_builder,
      schedule=SCHEDULE,
      reward_fn=mean_reward,
      num_steps=3,
      shape=(2, 2, 1),
  )
  cond, key = jnp.zeros(2, jnp.int32), jax.random.key(0)
  g1, _ = jitted_gradient(**options)(params, cond, key)
  g3, _ = jitted_gradient(reward_scale=3.0, **options)(params, cond, key)
  np.testing.assert_allclose(g3["w"], 3.0 * g1["w"], rtol=1e-6)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(reward_fn=jpeg_compressibility()), "host reward"),
        (dict(lv_samples=2, truncation_k=3), "implies truncation_k=1"),
        (dict(truncation_k=5), "between 1 and num_steps=4"),
        (dict(kl_weight=0.1), "needs base_eps_fn_builder"),
        (dict(eta=1.5), "eta=1.5"),
        (dict(lv_samples=-1), "lv_samples=-1"),
    ],
)
def test_bad_options_are_refused_before_compilation(override, match):
  options = dict(
      eps_fn_builder=per_step_builder,
      schedule=SCHEDULE,
      reward_fn=mean_reward,
      optimizer=optax.sgd(0.1),
      num_steps=4,
      shape=(2, 2, 1),
  )
  with pytest.raises(ValueError, match=match):
    draft.make_update_fn(**{**options, **override})
