"""DDPO's pieces against hand-computed values and independent re-derivations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax.algorithms import ddpo
from alignjax.diffusion import samplers, schedules
from alignjax.training import TrainState

# ----------------------------------------------------------------------------- advantages


def test_tracker_uses_batch_stats_below_min_count_then_prompt_buffer():
  tracker = ddpo.PerPromptStatTracker(buffer_size=4, min_count=3)
  prompts = np.array([0, 0, 1])
  rewards = np.array([1.0, 3.0, 8.0])
  adv = tracker.update(prompts, rewards)
  # Both prompts have < 3 rewards: the whole batch normalises them (eq. 2).
  expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
  np.testing.assert_allclose(adv, expected, rtol=1e-6)

  adv = tracker.update(np.array([0, 1]), np.array([5.0, 2.0]))
  buf0 = np.array([1.0, 3.0, 5.0])  # prompt 0 now has 3 rewards: its own buffer
  batch = np.array([5.0, 2.0])  # prompt 1 has 2: batch statistics
  np.testing.assert_allclose(adv[0], (5.0 - buf0.mean()) / (buf0.std() + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(adv[1], (2.0 - batch.mean()) / (batch.std() + 1e-6), rtol=1e-6)


def test_tracker_buffer_keeps_only_the_last_rewards_and_round_trips():
  tracker = ddpo.PerPromptStatTracker(buffer_size=2, min_count=1)
  tracker.update(np.array([7, 7, 7]), np.array([1.0, 2.0, 4.0]))
  assert tracker.state_dict()["buffers"] == {"7": [2.0, 4.0]}
  adv = tracker.update(np.array([7]), np.array([6.0]))
  np.testing.assert_allclose(adv, [(6.0 - 5.0) / (1.0 + 1e-6)], rtol=1e-6)
  clone = ddpo.PerPromptStatTracker.from_state_dict(tracker.state_dict())
  np.testing.assert_array_equal(
      clone.update(np.array([7, 3]), np.array([0.0, 1.0])),
      tracker.update(np.array([7, 3]), np.array([0.0, 1.0])),
  )


def test_tracker_rejects_bad_settings_and_mismatched_lengths():
  with pytest.raises(ValueError, match="min_count=5 can never be reached"):
    ddpo.PerPromptStatTracker(buffer_size=4, min_count=5)
  with pytest.raises(ValueError, match="must be > 0"):
    ddpo.PerPromptStatTracker(buffer_size=0, min_count=0)
  with pytest.raises(ValueError, match="3 prompts for 2 rewards"):
    ddpo.PerPromptStatTracker(4, 1).update(np.array([1, 2, 3]), np.array([1.0, 2.0]))


def test_batch_advantages():
  r = np.array([0.0, 1.0, 2.0, 5.0])
  np.testing.assert_allclose(ddpo.batch_advantages(r), (r - 2.0) / (r.std() + 1e-6), rtol=1e-6)


# ----------------------------------------------------------------------------- losses


def test_clipped_surrogate_matches_a_direct_evaluation():
  rng = np.random.default_rng(0)
  new, old, adv = rng.normal(size=(3, 64)) * np.array([[0.3], [0.3], [1.0]])
  eps = 0.1
  ratio = np.exp(new - old)
  expected = np.mean([max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)) for a, r in zip(adv, ratio)])
  got = ddpo.clipped_surrogate_loss(jnp.array(new), jnp.array(old), jnp.array(adv), eps)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_clipping_zeroes_the_gradient_only_beyond_the_trust_region():
  old = jnp.zeros(4)
  adv = jnp.array([1.0, 1.0, -1.0, -1.0])
  new = jnp.log(jnp.array([1.5, 0.5, 1.5, 0.5]))  # ρ outside [0.8, 1.2] for all four
  grad = jax.grad(ddpo.clipped_surrogate_loss)(new, old, adv, 0.2)
  # A > 0, ρ > 1 + ε: clipped (no push further); A > 0, ρ < 1 − ε: unclipped term is the max.
  # A < 0, ρ > 1 + ε: unclipped is the max; A < 0, ρ < 1 − ε: clipped.
  np.testing.assert_allclose(grad, [0.0, -0.5 / 4, 1.5 / 4, 0.0], rtol=1e-6)


def test_on_policy_clipped_gradient_equals_the_score_function_gradient():
  lp = jnp.array([0.3, -1.2, 0.7])
  adv = jnp.array([1.0, -2.0, 0.5])
  g_clip = jax.grad(ddpo.clipped_surrogate_loss)(lp, lp, adv, 1e-4)
  g_sf = jax.grad(ddpo.score_function_loss)(lp, adv)
  np.testing.assert_allclose(g_clip, g_sf, rtol=1e-6)
  np.testing.assert_allclose(g_sf, -adv / 3, rtol=1e-6)


def test_policy_diagnostics():
  new, old = jnp.log(jnp.array([1.0, 1.5, 0.9])), jnp.zeros(3)
  d = ddpo.policy_diagnostics(new, old, 0.2)
  np.testing.assert_allclose(d["approx_kl"], 0.5 * np.mean(np.log([1.0, 1.5, 0.9]) ** 2), rtol=1e-6)
  np.testing.assert_allclose(d["clipfrac"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose([d["ratio_min"], d["ratio_max"]], [0.9, 1.5], rtol=1e-6)


# ----------------------------------------------------------------------------- pairs and epochs

SCHEDULE = schedules.make_schedule("linear")
SHAPE = (4, 4, 1)
NUM_STEPS = 5
ETA = 1.0


def affine_eps_builder(trainable, frozen):
  del frozen
  return lambda x, t, c: (
      trainable["w"] * x
      + trainable["b"]
      + trainable["c"][c][:, None, None, None]
      + 1e-4 * t[:, None, None, None].astype(jnp.float32)
  )


def toy_params():
  return {"w": jnp.array(0.1), "b": jnp.full((1,), 0.05), "c": jnp.linspace(-0.2, 0.2, 11)}


CLIP = 1.0


@functools.partial(jax.jit, static_argnames=("batch", "guidance"))
def _toy_sample(params, key, batch, guidance):
  eps_fn = samplers.classifier_free_guidance(affine_eps_builder(params, {}), guidance, 10)
  cond = jnp.arange(batch, dtype=jnp.int32) % 10
  return samplers.sample(
      eps_fn, SCHEDULE, cond, key, shape=SHAPE, num_steps=NUM_STEPS, eta=ETA, clip_sample=CLIP
  )


def toy_trajectory(params, batch=6, guidance=1.5, key=0):
  return _toy_sample(params, jax.random.key(key), batch, guidance)


def assert_trees_close(actual, desired, rel=1e-4):
  """Equal up to `rel` times the largest entry: float32 sums of O(1/σ²) terms lose ~1e-5."""
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(desired))
  for a, d in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(desired)):
    np.testing.assert_allclose(a, d, rtol=0, atol=rel * scale)


def test_training_pairs_are_consistent_whole_samples():
  traj = toy_trajectory(toy_params())
  adv = jnp.arange(6, dtype=jnp.float32)
  pairs = ddpo.training_pairs(
      traj, adv, jax.random.key(3), timestep_fraction=0.6, num_minibatches=2
  )
  n_train = ddpo.num_train_steps(NUM_STEPS, 0.6, schedule=SCHEDULE, eta=ETA)
  assert n_train == 2 and pairs["x_t"].shape == (2, 3 * n_train) + SHAPE  # ⌊0.6 · 4⌋, rule (7)
  seen = []
  for mb in range(2):
    for i in range(3 * n_train):
      row = int(pairs["advantages"][mb, i])  # advantages identify the sample
      step = int(np.flatnonzero(np.asarray(traj.timesteps) == int(pairs["t"][mb, i]))[0])
      np.testing.assert_array_equal(pairs["x_t"][mb, i], traj.latents[row, step])
      np.testing.assert_array_equal(pairs["x_prev"][mb, i], traj.latents[row, step + 1])
      assert int(pairs["prev_t"][mb, i]) == int(traj.prev_timesteps[step])
      assert float(pairs["old_log_prob"][mb, i]) == float(traj.log_probs[row, step])
      assert int(pairs["cond"][mb, i]) == int(traj.cond[row])
      seen.append((row, step))
  assert len(set(seen)) == len(seen)  # no (sample, step) pair twice
  assert NUM_STEPS - 1 not in {step for _, step in seen}  # the last step has σ = 0
  rows_per_mb = [{int(r) for r in pairs["advantages"][mb]} for mb in range(2)]
  assert [len(r) for r in rows_per_mb] == [3, 3] and not rows_per_mb[0] & rows_per_mb[1]


SD_SCHEDULE = schedules.make_schedule(  # Stable Diffusion's: the last step is stochastic too
    "scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1
)


def float64_stds(schedule, num_steps, eta):
  """σ of samplers eq. 2 at the inference timesteps, re-derived in float64 from the betas."""
  abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
  n, offset = schedule.num_train_timesteps, schedule.steps_offset
  t = (np.arange(num_steps - 1, -1, -1) * (n // num_steps) + offset).astype(int)
  s = t - n // num_steps
  final = 1.0 if float(schedule.final_alpha_cumprod) == 1.0 else abar[0]
  abar_t, abar_s = abar[t], np.where(s >= 0, abar[np.maximum(s, 0)], final)
  return eta * np.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 50])
def test_stochastic_steps_are_those_with_positive_std(num_steps):
  # The digits' linear schedule ends at abar = 1: its last step is deterministic (σ = 0).
  expected = np.flatnonzero(float64_stds(SCHEDULE, num_steps, ETA) > 0)
  np.testing.assert_array_equal(expected, np.arange(num_steps - 1))
  np.testing.assert_array_equal(ddpo.stochastic_steps(SCHEDULE, num_steps, ETA), expected)
  np.testing.assert_array_equal(
      ddpo.stochastic_steps(SD_SCHEDULE, num_steps, 0.7), np.arange(num_steps)
  )
  assert ddpo.stochastic_steps(SCHEDULE, num_steps, 0.0).size == 0  # deterministic DDIM


def test_stochastic_steps_agree_with_the_sampled_trajectory():
  traj = toy_trajectory(toy_params())
  assert float(traj.stds[-1]) == 0.0 and bool(jnp.all(traj.stds[:-1] > 0))
  np.testing.assert_array_equal(
      ddpo.stochastic_steps(SCHEDULE, NUM_STEPS, ETA), np.flatnonzero(np.asarray(traj.stds) > 0)
  )


@pytest.mark.parametrize(
    "num_steps,fraction", [(5, 1.0), (5, 0.6), (10, 0.5), (10, 0.05), (4, 0.5)]
)
def test_num_train_steps_is_a_fraction_of_the_stochastic_steps(num_steps, fraction):
  got = ddpo.num_train_steps(num_steps, fraction, schedule=SCHEDULE, eta=ETA)
  assert got == max(1, int((num_steps - 1) * fraction))  # rule (7), |S| = T − 1
  assert ddpo.num_train_steps(num_steps, fraction, schedule=SD_SCHEDULE, eta=ETA) == max(
      1, int(num_steps * fraction)
  )
  assert ddpo.num_train_steps(num_steps, fraction) == max(1, int(num_steps * fraction))


def test_num_train_steps_refuses_a_chain_without_a_stochastic_step():
  with pytest.raises(ValueError, match="none of the 1 denoising steps is stochastic"):
    ddpo.num_train_steps(1, 1.0, schedule=SCHEDULE, eta=ETA)
  with pytest.raises(ValueError, match="none of the 5 denoising steps"):
    ddpo.num_train_steps(5, 0.5, schedule=SCHEDULE, eta=0.0)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.75, 1.0])
def test_training_pairs_draw_the_fraction_from_the_stochastic_steps_only(fraction):
  traj = toy_trajectory(toy_params())
  pairs = ddpo.training_pairs(
      traj, jnp.arange(6.0), jax.random.key(5), timestep_fraction=fraction, num_minibatches=1
  )
  n_train = max(1, int((NUM_STEPS - 1) * fraction))
  assert pairs["t"].shape == (1, 6 * n_train)
  steps = [int(np.flatnonzero(np.asarray(traj.timesteps) == int(t))[0]) for t in pairs["t"][0]]
  assert NUM_STEPS - 1 not in steps  # the σ = 0 step never trains
  rows = [int(a) for a in pairs["advantages"][0]]
  assert sorted(rows) == sorted(list(range(6)) * n_train)  # n steps of every sample
  assert len(set(zip(rows, steps))) == 6 * n_train
  if fraction == 1.0:  # every stochastic (sample, step) pair exactly once
    assert set(zip(rows, steps)) == {(b, k) for b in range(6) for k in range(NUM_STEPS - 1)}


def test_training_pairs_over_all_steps_draw_as_without_rule_7():
  """With every step stochastic (Stable Diffusion), S = all T steps: the old draws, bit for bit."""
  traj = toy_trajectory(toy_params())
  key = jax.random.key(9)
  pairs = ddpo.training_pairs(
      traj,
      jnp.arange(6.0),
      key,
      timestep_fraction=0.6,
      num_minibatches=2,
      steps=np.arange(NUM_STEPS),
  )
  key_samples, key_steps = jax.random.split(key)  # the draws before rule (7)
  rows = jax.random.permutation(key_samples, 6)
  steps = jax.vmap(lambda k: jax.random.permutation(k, NUM_STEPS)[:3])(
      jax.random.split(key_steps, 6)
  )
  rows = jnp.broadcast_to(rows[:, None], steps.shape)
  np.testing.assert_array_equal(
      pairs["x_t"].reshape((-1,) + SHAPE), traj.latents[rows, steps].reshape((-1,) + SHAPE)
  )
  np.testing.assert_array_equal(pairs["t"].reshape(-1), traj.timesteps[steps].reshape(-1))
  with pytest.raises(ValueError, match="distinct step indices"):
    ddpo.training_pairs(
        traj, jnp.arange(6.0), key, timestep_fraction=1.0, num_minibatches=1, steps=[0, 5]
    )


def _epoch(
    objective,
    num_minibatches=1,
    num_microbatches=1,
    guidance=1.5,
    lr=1.0,
    optimizer=None,
    **options,
):
  return jax.jit(
      ddpo.make_epoch_fn(
          affine_eps_builder,
          SCHEDULE,
          optimizer or optax.sgd(lr),
          objective=objective,
          clip_range=0.2,
          eta=ETA,
          guidance_scale=guidance,
          null_cond=10,
          timestep_fraction=1.0,
          num_minibatches=num_minibatches,
          num_microbatches=num_microbatches,
          clip_sample=CLIP,
          **options,
      )
  )


def test_score_function_epoch_is_one_reinforce_step():
  params = toy_params()
  traj = toy_trajectory(params)
  adv = jnp.array([1.0, -1.0, 0.5, 2.0, -0.3, 0.0])
  state = TrainState.create(params, optax.sgd(1.0), jax.random.key(0))
  new_state, metrics = _epoch("score_function")(state, {}, traj, adv)

  def reinforce_objective(p):  # eq. (4) summed step by step, independently of the pairing
    eps_fn = samplers.classifier_free_guidance(affine_eps_builder(p, {}), 1.5, 10)
    total = 0.0
    for k in range(NUM_STEPS - 1):  # rule (7): the last step (σ = 0, log π ≡ 0) does not train
      t = jnp.full((6,), traj.timesteps[k])
      prev_t = jnp.full((6,), traj.prev_timesteps[k])
      lp = samplers.step_log_prob(
          eps_fn,
          SCHEDULE,
          traj.latents[:, k],
          traj.latents[:, k + 1],
          t,
          prev_t,
          traj.cond,
          ETA,
          clip_sample=CLIP,
      )
      total = total + jnp.sum(adv * lp)
    return -total / (6 * (NUM_STEPS - 1))

  loss, grads = jax.value_and_grad(reinforce_objective)(params)
  assert_trees_close(jax.tree_util.tree_map(jnp.subtract, params, new_state.params), grads)
  np.testing.assert_allclose(metrics["loss"][0], loss, rtol=1e-5)  # not diluted by 4/5
  assert int(new_state.step) == 1
  np.testing.assert_allclose(metrics["ratio_mean"], 1.0, atol=1e-6)  # on-policy


def test_clipped_epoch_starts_on_policy_and_matches_score_function_first_step():
  params = toy_params()
  traj = toy_trajectory(params)
  adv = jnp.array([1.0, -1.0, 0.5, 2.0, -0.3, 0.0])
  state = TrainState.create(params, optax.sgd(1.0), jax.random.key(0))
  sf_state, _ = _epoch("score_function")(state, {}, traj, adv)
  state = TrainState.create(params, optax.sgd(1.0), jax.random.key(0))
  clip_state, m = _epoch("clipped")(state, {}, traj, adv)
  assert_trees_close(
      jax.tree_util.tree_map(jnp.subtract, params, clip_state.params),
      jax.tree_util.tree_map(jnp.subtract, params, sf_state.params),
  )
  assert float(m["ratio_min"][0]) == pytest.approx(1.0, abs=1e-6)
  assert float(m["ratio_max"][0]) == pytest.approx(1.0, abs=1e-6)


def test_off_policy_clipped_epoch_matches_a_reference_over_the_stochastic_steps():
  """Loss, diagnostics and gradient of eqs. (5)-(6) over the B·(T − 1) pairs with σ > 0 only.

  Off-policy, the σ = 0 step would add terms with ρ = 1 and zero gradient: a loss shifted
  toward −mean(A), an approx_kl shrunk by (T − 1)/T and a gradient shrunk by the same factor.
  """
  old_params = toy_params()
  traj = toy_trajectory(old_params)
  params = jax.tree_util.tree_map(lambda p: p * 1.3 + 0.01, old_params)  # another policy
  adv = jnp.array([1.0, -1.0, 0.5, 2.0, -0.3, 0.7])
  state = TrainState.create(params, optax.sgd(1.0), jax.random.key(0))
  new_state, metrics = _epoch("clipped")(state, {}, traj, adv)

  def reference(p):
    eps_fn = samplers.classifier_free_guidance(affine_eps_builder(p, {}), 1.5, 10)
    lps, olds = [], []
    for k in np.flatnonzero(float64_stds(SCHEDULE, NUM_STEPS, ETA) > 0):
      lps.append(
          samplers.step_log_prob(
              eps_fn,
              SCHEDULE,
              traj.latents[:, k],
              traj.latents[:, k + 1],
              jnp.full((6,), traj.timesteps[k]),
              jnp.full((6,), traj.prev_timesteps[k]),
              traj.cond,
              ETA,
              clip_sample=CLIP,
          )
      )
      olds.append(traj.log_probs[:, k])
    lp, old = jnp.concatenate(lps), jnp.concatenate(olds)
    a = jnp.tile(adv, len(lps))
    ratio = jnp.exp(lp - old)
    loss = jnp.mean(jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 0.8, 1.2)))  # eq. (5)
    return loss, 0.5 * jnp.mean((lp - old) ** 2)  # eq. (6)

  (loss, approx_kl), grads = jax.value_and_grad(reference, has_aux=True)(params)
  assert float(approx_kl) > 1e-4  # far from on-policy: the σ = 0 step would show
  np.testing.assert_allclose(metrics["loss"][0], loss, rtol=1e-4)
  np.testing.assert_allclose(metrics["approx_kl"][0], approx_kl, rtol=1e-4)
  assert_trees_close(jax.tree_util.tree_map(jnp.subtract, params, new_state.params), grads)


def test_num_microbatches_must_divide_the_stochastic_pairs():
  # 3 samples × 4 stochastic steps = 12 pairs per minibatch (with the σ = 0 step: 15).
  traj = toy_trajectory(toy_params())
  state = TrainState.create(toy_params(), optax.sgd(0.1), jax.random.key(0))
  with pytest.raises(ValueError, match="num_microbatches=5 must divide the 12"):
    _epoch("clipped", num_minibatches=2, num_microbatches=5)(state, {}, traj, jnp.zeros(6))


def test_microbatching_does_not_change_the_update():
  params = toy_params()
  traj = toy_trajectory(params)
  adv = jnp.linspace(-1, 1, 6)
  outs = []
  for micro in (1, 3):
    state = TrainState.create(params, optax.sgd(0.1), jax.random.key(0))
    outs.append(
        _epoch("clipped", num_minibatches=2, num_microbatches=micro)(state, {}, traj, adv)[0].params
    )
  assert_trees_close(outs[1], outs[0], rel=1e-6)


def test_unrolled_and_scanned_minibatch_loops_give_the_same_update():
  params = toy_params()
  traj = toy_trajectory(params)
  adv = jnp.linspace(-1, 1, 6)
  outs = []
  for loop in ddpo.MINIBATCH_LOOPS:
    state = TrainState.create(params, optax.adam(0.05), jax.random.key(0))
    state, metrics = _epoch(
        "clipped", num_minibatches=3, optimizer=optax.adam(0.05), minibatch_loop=loop
    )(state, {}, traj, adv)
    assert metrics["loss"].shape == (3,)
    outs.append((state.params, metrics))
  assert_trees_close(outs[1][0], outs[0][0], rel=1e-6)
  assert_trees_close(outs[1][1], outs[0][1], rel=1e-6)
  with pytest.raises(ValueError, match="minibatch_loop='while'.*valid choices"):
    _epoch("clipped", num_minibatches=1, minibatch_loop="while")


@pytest.mark.parametrize(
    "objective,num_minibatches,optimizer",
    [("score_function", 2, optax.sgd(0.05)), ("clipped", 1, optax.adam(0.05))],
)
def test_ddpo_increases_a_reward_on_a_toy_policy(objective, num_minibatches, optimizer):
  """Reward = mean pixel of x_0: DDPO must learn to shift samples upward (a sign test)."""
  params = {"w": jnp.array(0.1), "b": jnp.full((1,), 0.05), "c": jnp.zeros(11)}
  state = TrainState.create(params, optimizer, jax.random.key(1))
  epoch = jax.jit(
      ddpo.make_epoch_fn(
          affine_eps_builder,
          SCHEDULE,
          optimizer,
          objective=objective,
          clip_range=0.2,
          eta=ETA,
          guidance_scale=1.0,
          null_cond=10,
          timestep_fraction=1.0,
          num_minibatches=num_minibatches,
          clip_sample=CLIP,
      )
  )

  def sample_rewards(p, key):
    traj = toy_trajectory(p, batch=64, guidance=1.0, key=key)
    return traj, np.asarray(traj.final.mean(axis=(1, 2, 3)))

  _, before = sample_rewards(state.params, 100)
  for round_ in range(30):
    traj, r = sample_rewards(state.params, round_)
    state, _ = epoch(state, {}, traj, jnp.asarray(ddpo.batch_advantages(r)))
  _, after = sample_rewards(state.params, 100)
  assert after.mean() > before.mean() + before.std()
  assert float(state.params["b"][0]) < 0.0  # a negative noise bias raises x_0


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="valid choices are"):
    _epoch("ppo")
  with pytest.raises(ValueError, match="eta > 0"):
    ddpo.make_epoch_fn(
        affine_eps_builder,
        SCHEDULE,
        optax.sgd(1.0),
        objective="clipped",
        clip_range=0.2,
        eta=0.0,
        guidance_scale=1.0,
        null_cond=10,
        timestep_fraction=1.0,
        num_minibatches=1,
    )
  with pytest.raises(ValueError, match="must lie in"):
    ddpo.num_train_steps(10, 0.0)
