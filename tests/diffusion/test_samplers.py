"""DDIM steps, log-probs, guidance and the scan sampler, against diffusers, scipy and numpy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignjax.diffusion import samplers, schedules

NULL = 10


def _noise(key, shape):
  """The z of eq. 4 that ddim_step draws from `key` (documented behaviour)."""
  return jax.random.normal(key, shape, jnp.float32)


# ----------------------------------------------------------------------------- one step


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("set_alpha_to_one,steps_offset", [(True, 0), (False, 1), (False, 0)])
def test_ddim_step_equals_diffusers(eta, clip, set_alpha_to_one, steps_offset):
  num_steps = 50
  ref = DDIMScheduler(
      beta_schedule="scaled_linear",
      beta_start=0.00085,
      beta_end=0.012,
      clip_sample=clip is not None,
      set_alpha_to_one=set_alpha_to_one,
      steps_offset=steps_offset,
  )
  ref.set_timesteps(num_steps)
  sched = schedules.make_schedule(
      "scaled_linear",
      1000,
      0.00085,
      0.012,
      set_alpha_to_one=set_alpha_to_one,
      steps_offset=steps_offset,
  )
  prev_ts = schedules.inference_prev_timesteps(1000, num_steps, steps_offset)
  rng = np.random.default_rng(0)
  for i in (0, 10, 25, 48, 49):  # 49 is the last step (prev_t < 0)
    t = int(ref.timesteps[i])
    x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    eps = rng.normal(size=x.shape).astype(np.float32)
    key = jax.random.key(i)
    out = samplers.ddim_step(sched, eps, x, t, int(prev_ts[i]), eta, key=key, clip_sample=clip)
    noise = np.array(_noise(key, x.shape))  # a writable copy for torch
    want = ref.step(
        torch.from_numpy(eps),
        t,
        torch.from_numpy(x),
        eta=eta,
        variance_noise=torch.from_numpy(noise),
    )
    np.testing.assert_allclose(out.prev_sample, want.prev_sample.numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out.x0_pred, want.pred_original_sample.numpy(), atol=2e-5, rtol=1e-5)
    # Zero noise gives the mean (eq. 3); diffusers' variance gives sigma_t (eq. 2).
    want_mean = ref.step(
        torch.from_numpy(eps), t, torch.from_numpy(x), eta=eta, variance_noise=torch.zeros(x.shape)
    ).prev_sample.numpy()
    np.testing.assert_allclose(out.mean, want_mean, atol=2e-5, rtol=1e-5)
    want_std = eta * float(ref._get_variance(t, int(prev_ts[i]))) ** 0.5
    np.testing.assert_allclose(out.std, [want_std] * 2, atol=1e-7, rtol=1e-5)
    if i == 49 and eta > 0:  # stochastic last step only for Stable Diffusion's setting
      assert np.all(np.asarray(out.std) == 0) == (steps_offset == 0)
      if not set_alpha_to_one and steps_offset == 0 and clip is None:  # abar_0 -> abar_0
        np.testing.assert_allclose(out.prev_sample, x, atol=1e-6)


@pytest.mark.parametrize("t", [1, 100, 500, 900])
def test_eta_one_consecutive_steps_is_ddpm_posterior(t):
  # With s = t - 1, eq. 2-3 at eta = 1 are the DDPM posterior q(x_{t-1} | x_t, x0_hat).
  sched = schedules.make_schedule("linear", 1000)
  rng = np.random.default_rng(t)
  x = rng.normal(size=(2, 3, 3, 1)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  out = samplers.ddim_step(sched, eps, x, t, t - 1, 1.0, key=jax.random.key(0))
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  x0 = (x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
  mean = (
      np.sqrt(abar[t - 1]) * betas[t] / (1 - abar[t]) * x0
      + np.sqrt(1 - betas[t]) * (1 - abar[t - 1]) / (1 - abar[t]) * x
  )
  np.testing.assert_allclose(out.mean, mean, rtol=1e-4, atol=1e-5)
  # The DDPM posterior variance, exactly and as diffusers' "fixed_small" (float32: 1 - abar
  # cancels at small t, hence the tolerance).
  var = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
  np.testing.assert_allclose(np.asarray(out.std) ** 2, [var] * 2, rtol=5e-4)
  ddpm_var = float(DDPMScheduler()._get_variance(t))
  np.testing.assert_allclose(np.asarray(out.std) ** 2, [ddpm_var] * 2, rtol=5e-4)


def test_log_prob_equals_scipy():
  sched = schedules.make_schedule("linear", 1000)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  t = np.array([999, 500, 20], np.int32)  # per-example timesteps
  prev_t = t - 20
  sampled = samplers.ddim_step(sched, eps, x, t, prev_t, 0.8, key=jax.random.key(3))
  given = rng.normal(size=x.shape).astype(np.float32)
  scored = samplers.ddim_step(sched, eps, x, t, prev_t, 0.8, prev_sample=given)
  for out, x_prev in ((sampled, np.asarray(sampled.prev_sample)), (scored, given)):
    std = np.asarray(out.std, np.float64)[:, None, None, None]
    ref = scipy.stats.norm.logpdf(x_prev, np.asarray(out.mean, np.float64), std)
    np.testing.assert_allclose(out.log_prob, ref.mean(axis=(1, 2, 3)), rtol=2e-5)
    np.testing.assert_allclose(out.log_prob_sum, ref.sum(axis=(1, 2, 3)), rtol=2e-5)
  np.testing.assert_array_equal(scored.mean, sampled.mean)  # scoring does not move the mean


@pytest.mark.parametrize("d", [1, 2, 7, 128, 129])
def test_fixed_order_sum(d):
  rng = np.random.default_rng(d)
  v = rng.normal(size=(40, d)).astype(np.float32)
  total = np.asarray(jax.jit(samplers.fixed_order_sum)(v))
  np.testing.assert_allclose(total, v.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-5)
  # A row's bits do not depend on the batch it is summed in, nor on vmap.
  np.testing.assert_array_equal(jax.jit(samplers.fixed_order_sum)(v[3:6]), total[3:6])
  np.testing.assert_array_equal(
      jax.vmap(samplers.fixed_order_sum)(v.reshape(8, 5, d)), total.reshape(8, 5)
  )
  assert samplers.fixed_order_sum(v.reshape(40, 1, d, 1)).shape == (40,)


def test_log_prob_is_zero_with_zero_gradient_where_std_is_zero():
  sched = schedules.make_schedule("linear", 1000)  # abar = 1 past the end: last std is 0
  x = jnp.ones((2, 2, 2, 1))
  eps = 0.3 * jnp.ones_like(x)
  x_prev = jnp.zeros_like(x)

  def lp(eps, t, prev_t, eta):
    return samplers.ddim_step(sched, eps, x, t, prev_t, eta, prev_sample=x_prev).log_prob.sum()

  for t, prev_t, eta in ((0, -20, 1.0), (500, 480, 0.0)):
    assert float(lp(eps, t, prev_t, eta)) == 0.0
    grad = jax.grad(lp)(eps, t, prev_t, eta)
    assert np.all(np.asarray(grad) == 0.0)
  assert float(lp(eps, 500, 480, 1.0)) != 0.0


# ----------------------------------------------------------------------------- guidance


class _Counting:

  def __init__(self, fn):
    self.fn, self.batch_sizes = fn, []

  def __call__(self, x, t, c):
    self.batch_sizes.append(x.shape[0])
    return self.fn(x, t, c)


@pytest.mark.parametrize("w", [3.0, 7.5, -0.5])
def test_guidance_is_one_call_and_equals_two_calls(linear_eps, w):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)
  t = jnp.array([10, 200, 999, 0], jnp.int32)
  c = jnp.array([0, 3, 9, 5], jnp.int32)
  counting = _Counting(linear_eps.jax)
  guided = samplers.classifier_free_guidance(counting, w, null_cond=NULL)(x, t, c)
  assert counting.batch_sizes == [8]
  e_c = linear_eps.jax(x, t, c)
  e_u = linear_eps.jax(x, t, jnp.full_like(c, NULL))
  np.testing.assert_allclose(guided, e_u + w * (e_c - e_u), atol=1e-6)


def test_guidance_scale_one_and_zero_take_one_plain_pass(linear_eps):
  x = jnp.ones((2, 3, 3, 2))
  t, c = jnp.array([5, 6]), jnp.array([1, 2])
  counting = _Counting(linear_eps.jax)
  assert samplers.classifier_free_guidance(counting, 1.0) is counting
  uncond = samplers.classifier_free_guidance(counting, 0.0, null_cond=NULL)(x, t, c)
  assert counting.batch_sizes == [2]
  np.testing.assert_array_equal(uncond, linear_eps.jax(x, t, jnp.full_like(c, NULL)))
  with pytest.raises(ValueError, match="guidance_scale=inf"):
    samplers.classifier_free_guidance(counting, float("inf"))


# ----------------------------------------------------------------------------- sampler


def _numpy_ddim(eps_np, x, cond, n, num_steps, clip):
  """An independent float64 DDIM (eta = 0) loop from the formulas of the DDIM paper."""
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, n))
  k = n // num_steps
  xs = [x.astype(np.float64)]
  for t in range(k * (num_steps - 1), -1, -k):
    a_t, a_s = abar[t], (abar[t - k] if t - k >= 0 else 1.0)
    eps = eps_np(xs[-1], np.full(len(cond), t), cond)
    x0 = (xs[-1] - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    if clip:
      x0 = np.clip(x0, -1, 1)
    xs.append(np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps)
  return np.stack(xs, axis=1)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_eta_zero_sampler_is_deterministic_ddim(linear_eps, clip):
  sched = schedules.make_schedule("linear", 1000)
  cond = jnp.array([0, 4, 9], jnp.int32)
  x_init = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  run = jax.jit(
      lambda key: samplers.sample(
          linear_eps.jax,
          sched,
          cond,
          key,
          shape=(4, 4, 2),
          num_steps=20,
          eta=0.0,
          clip_sample=clip,
          initial_latents=x_init,
      )
  )
  a, b = run(jax.random.key(1)), run(jax.random.key(2))
  chex.assert_trees_all_equal(a, b)  # different keys, identical trajectories
  assert np.all(np.asarray(a.stds) == 0) and np.all(np.asarray(a.log_probs) == 0)
  want = _numpy_ddim(linear_eps.numpy, np.asarray(x_init), np.asarray(cond), 1000, 20, clip)
  np.testing.assert_allclose(a.latents, want, atol=1e-4)
  # and diffusers' scheduler iterated on the same eps function
  ref = DDIMScheduler(clip_sample=clip is not None)
  ref.set_timesteps(20)
  x = torch.from_numpy(np.array(x_init))  # a writable copy
  for t in ref.timesteps:
    eps = linear_eps.numpy(x.numpy(), np.full(3, int(t)), np.asarray(cond)).astype(np.float32)
    x = ref.step(torch.from_numpy(eps), t, x, eta=0.0).prev_sample
  np.testing.assert_allclose(a.final, x.numpy(), atol=1e-4)


def test_sampler_shapes_keys_and_noise_statistics(linear_eps):
  sched = schedules.make_schedule("cosine", 1000, set_alpha_to_one=False, steps_offset=1)
  cond = jnp.arange(16, dtype=jnp.int32) % 10

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key):
    return samplers.sample(linear_eps.jax, sched, cond, key, shape=(8, 8, 2), num_steps=10, eta=1.0)

  traj = run(jax.random.key(0))
  assert traj.latents.shape == (16, 11, 8, 8, 2) and traj.final.shape == (16, 8, 8, 2)
  assert traj.log_probs.shape == traj.log_prob_sums.shape == (16, 10)
  np.testing.assert_array_equal(traj.timesteps, schedules.inference_timesteps(1000, 10, 1))
  np.testing.assert_array_equal(
      traj.prev_timesteps, schedules.inference_prev_timesteps(1000, 10, 1)
  )
  # Bitwise equal although `sched` is a compile-time constant of `run` (no constant folding).
  np.testing.assert_array_equal(
      traj.stds, samplers.ddim_std(sched, traj.timesteps, traj.prev_timesteps, 1.0)
  )
  np.testing.assert_allclose(traj.log_prob_sums, traj.log_probs * 128, rtol=1e-5)
  assert traj.num_steps == 10 and np.all(np.asarray(traj.stds) > 0)
  chex.assert_trees_all_equal(traj, run(jax.random.key(0)))  # same key, same trajectory
  other = run(jax.random.key(1))  # no retrace (assert_max_traces)
  assert not np.allclose(other.latents[:, 0], traj.latents[:, 0])
  assert not np.allclose(other.final, traj.final)
  # x_prev - mean is sigma_t * N(0, I) at every step (eq. 4).
  tr = samplers.transitions(traj)
  eps = linear_eps.jax(tr.x_t, tr.t, tr.cond)
  out = samplers.ddim_step(sched, eps, tr.x_t, tr.t, tr.prev_t, 1.0, prev_sample=tr.x_prev)
  z = np.asarray((tr.x_prev - out.mean) / out.std[:, None, None, None])
  assert abs(z.mean()) < 0.03 and abs(z.var() - 1) < 0.05
  assert abs(np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]) < 0.05  # fresh noise per step


def test_transitions_layout():
  traj = samplers.Trajectory(
      latents=jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3, 1, 1),
      timesteps=jnp.array([20, 10, 0]),
      prev_timesteps=jnp.array([10, 0, -10]),
      log_probs=jnp.arange(6.0).reshape(2, 3),
      log_prob_sums=jnp.zeros((2, 3)),
      stds=jnp.ones(3),
      cond=jnp.array([7, 8]),
  )
  flat = samplers.transitions(traj)
  assert flat.x_t.shape == (6, 3, 1, 1)
  for b in range(2):
    for i in range(3):
      r = b * 3 + i
      np.testing.assert_array_equal(flat.x_t[r], traj.latents[b, i])
      np.testing.assert_array_equal(flat.x_prev[r], traj.latents[b, i + 1])
      assert (int(flat.t[r]), int(flat.prev_t[r]), int(flat.cond[r])) == (
          [20, 10, 0][i],
          [10, 0, -10][i],
          [7, 8][b],
      )
      assert float(flat.log_prob[r]) == float(traj.log_probs[b, i])
  assert samplers.transitions(traj, flatten=False).x_t.shape == (2, 3, 3, 1, 1)


def _rescored_log_probs(apply, params, guidance_scale, sd_style):
  """Samples B=4 chains of T=8 steps under jit, then re-scores every step with step_log_prob
  as DDPO does: (a) one flattened batch of B*T pairs, (b) vmapped over the steps, (c) inside
  jax.value_and_grad of a clipped-ratio-like loss. Returns (old [B, T], [new_a, new_b, new_c])."""
  # sd_style: Stable Diffusion's final abar and offset make the last step stochastic too.
  sched = schedules.make_schedule(
      "linear", 1000, set_alpha_to_one=not sd_style, steps_offset=int(sd_style)
  )
  eta, clip, num_steps, batch = 1.0, 1.0, 8, 4

  def eps_fn(params):
    return samplers.classifier_free_guidance(
        lambda x, t, c: apply(params, x, t, c), guidance_scale, null_cond=NULL
    )

  @jax.jit
  def sample(params, cond, key):
    return samplers.sample(
        eps_fn(params),
        sched,
        cond,
        key,
        shape=(8, 8, 2),
        num_steps=num_steps,
        eta=eta,
        clip_sample=clip,
    )

  def score(params, tr):
    return samplers.step_log_prob(
        eps_fn(params), sched, tr.x_t, tr.x_prev, tr.t, tr.prev_t, tr.cond, eta, clip_sample=clip
    )

  def loss(params, tr):
    lp = score(params, tr)
    return -jnp.mean(jnp.minimum(jnp.exp(lp - tr.log_prob), 1.2)), lp

  traj = sample(params, jnp.array([1, 2, 3, 4], jnp.int32), jax.random.key(0))
  old = np.asarray(traj.log_probs)
  assert np.all(np.isfinite(old)) and np.all(old[:, :-1] != 0)
  assert np.all(old[:, -1] != 0) == sd_style  # std 0 -> log-prob 0 on a deterministic step
  flat = samplers.transitions(traj)
  new_flat = jax.jit(score)(params, flat).reshape(batch, num_steps)
  new_vmap = jax.vmap(jax.jit(score), in_axes=(None, 1), out_axes=1)(
      params, samplers.transitions(traj, flatten=False)
  )
  (_, new_grad), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, flat)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  return old, [np.asarray(v).reshape(batch, num_steps) for v in (new_flat, new_vmap, new_grad)]


@pytest.mark.parametrize("guidance_scale,sd_style", [(1.0, False), (3.0, True)])
def test_on_policy_ratio_is_exactly_one(product_eps, guidance_scale, sd_style):
  old, news = _rescored_log_probs(product_eps.apply, product_eps.params(), guidance_scale, sd_style)
  for new in news:
    np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(np.exp(new - old), 1.0)  # exactly 1 in float32


def test_on_policy_ratio_nnx_conv_model(tiny_conv):
  # A conv net called through nnx.merge, as training steps do. The samplers add no rounding
  # of their own (test above), but XLA's CPU convolutions may round an example differently in
  # a batch of B and of B*T: the ratio is then 1 up to float32 rounding (~6e-8 here).
  graphdef, params = tiny_conv
  old, news = _rescored_log_probs(
      lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c), params, 3.0, True
  )
  for new in news:
    assert np.max(np.abs(np.exp(new - old) - 1.0)) <= 1e-6


def test_sampler_batch_sharded_matches_unsharded(linear_eps):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  sched = schedules.make_schedule("linear", 1000)
  guided = samplers.classifier_free_guidance(linear_eps.jax, 2.0, null_cond=NULL)
  cond = jnp.arange(8, dtype=jnp.int32)

  def run(cond, key, sharding=None):
    return samplers.sample(
        guided, sched, cond, key, shape=(4, 4, 2), num_steps=5, eta=1.0, latent_sharding=sharding
    )

  key = jax.random.key(3)
  plain = jax.jit(run)(cond, key)
  sharded = jax.jit(lambda c, k: run(c, k, batch_sharding))(
      jax.device_put(cond, batch_sharding), key
  )
  assert sharded.latents.sharding.spec[0] == "data"
  assert len(sharded.latents.sharding.device_set) == 8
  # Same random numbers (partitionable threefry); matmul blocking may differ per shard.
  np.testing.assert_allclose(sharded.latents, plain.latents, rtol=5e-5, atol=1e-6)
  np.testing.assert_allclose(sharded.log_probs, plain.log_probs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pytree conditions


def test_pytree_conditions_sample_guide_and_score_like_arrays(linear_eps):
  """A dict condition (the class ids the model reads, plus a [B, S] leaf it ignores) gives
  the trajectory, guidance and log-probs of the bare class ids; the ignored leaf travels
  with every example (its null value included)."""
  sched = schedules.make_schedule("linear", 1000)
  ids = jnp.array([0, 4, 9], jnp.int32)
  tokens = jnp.arange(3 * 5, dtype=jnp.int32).reshape(3, 5)
  seen = []

  def dict_eps(x, t, c):
    if not isinstance(c["tokens"], jax.core.Tracer):
      seen.append(c["tokens"])
    return linear_eps.jax(x, t, c["ids"])

  bare = samplers.classifier_free_guidance(linear_eps.jax, 3.0, null_cond=NULL)
  tree = samplers.classifier_free_guidance(
      dict_eps, 3.0, null_cond={"ids": NULL, "tokens": jnp.full((5,), -1, jnp.int32)}
  )
  kw = dict(shape=(4, 4, 2), num_steps=6, eta=1.0)
  want = samplers.sample(bare, sched, ids, jax.random.key(3), **kw)
  got = samplers.sample(tree, sched, {"ids": ids, "tokens": tokens}, jax.random.key(3), **kw)
  np.testing.assert_array_equal(got.latents, want.latents)
  np.testing.assert_array_equal(got.log_probs, want.log_probs)
  x = jnp.ones((3, 4, 4, 2))
  tree(x, jnp.array([5, 6, 7]), {"ids": ids, "tokens": tokens})
  np.testing.assert_array_equal(tree(x, 5, {"ids": ids, "tokens": tokens}), bare(x, 5, ids))
  pairs = np.asarray(seen[0])  # cond and null interleaved per example (eq. 7's one call)
  np.testing.assert_array_equal(pairs[0::2], tokens)
  assert np.all(pairs[1::2] == -1)
  tr = samplers.transitions(got)
  assert tr.cond["tokens"].shape == (3 * 6, 5)
  np.testing.assert_array_equal(tr.cond["tokens"][6:12], np.broadcast_to(tokens[1], (6, 5)))
  lp = samplers.step_log_prob(tree, sched, tr.x_t, tr.x_prev, tr.t, tr.prev_t, tr.cond, 1.0)
  # eager here, jitted in the sampler: equal to float32 rounding amplified by 1/sigma_t
  np.testing.assert_allclose(lp, got.log_probs.reshape(-1), rtol=1e-4, atol=1e-5)
  assert samplers.batch_size({"ids": ids, "tokens": tokens}) == 3
  with pytest.raises(ValueError, match=r"cond must be \[B, ...\].*every leaf"):
    samplers.batch_size({"ids": ids, "tokens": tokens[:2]})
  with pytest.raises(ValueError, match="cond is empty"):
    samplers.batch_size({})


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(linear_eps):
  sched = schedules.make_schedule("linear", 50)
  x = jnp.zeros((2, 2, 2, 2))
  t, c = jnp.array([40, 40]), jnp.array([0, 1])
  kw = dict(shape=(2, 2, 2), num_steps=5)
  key = jax.random.key(0)
  for eta in (-0.1, 1.5):
    with pytest.raises(ValueError, match=rf"eta={eta}: must lie in \[0, 1\]"):
      samplers.sample(linear_eps.jax, sched, c, key, eta=eta, **kw)
    with pytest.raises(ValueError, match="eta="):
      samplers.ddim_step(sched, x, x, 40, 39, eta, key=key)
  with pytest.raises(ValueError, match="eta=0: deterministic"):
    samplers.step_log_prob(linear_eps.jax, sched, x, x, t, t - 10, c, 0.0)
  with pytest.raises(
      ValueError, match="num_steps=51: must be between 1 and " "num_train_timesteps=50"
  ):
    samplers.sample(linear_eps.jax, sched, c, key, shape=(2, 2, 2), num_steps=51, eta=1.0)
  with pytest.raises(ValueError, match="num_steps=0"):
    samplers.sample(linear_eps.jax, sched, c, key, shape=(2, 2, 2), num_steps=0, eta=1.0)
  with pytest.raises(ValueError, match="clip_sample=-1.0"):
    samplers.ddim_step(sched, x, x, 40, 39, 1.0, key=key, clip_sample=-1.0)
  with pytest.raises(ValueError, match="exactly one of key="):
    samplers.ddim_step(sched, x, x, 40, 39, 1.0, key=key, prev_sample=x)
  with pytest.raises(ValueError, match="exactly one of key="):
    samplers.ddim_step(sched, x, x, 40, 39, 1.0)
  with pytest.raises(TypeError, match="eta='high': must be a real number"):
    samplers.ddim_step(sched, x, x, 40, 39, "high", key=key)
  with pytest.raises(ValueError, match="eps shape"):
    samplers.ddim_step(sched, x[:, :1], x, 40, 39, 1.0, key=key)
  with pytest.raises(ValueError, match=r"cond must be \[B, ...\]"):
    samplers.sample(linear_eps.jax, sched, c[0], key, eta=1.0, **kw)
  with pytest.raises(ValueError, match="initial_latents shape"):
    samplers.sample(linear_eps.jax, sched, c, key, eta=1.0, initial_latents=x[:1], **kw)
