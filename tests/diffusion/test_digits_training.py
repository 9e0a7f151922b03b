"""Tests of alignjax/diffusion/digits_training.py (the pieces of the digits pretraining).

The whole pipeline (train_unet, sample_digits, sample_digits_flow on trained models) runs in
tests/experiments/test_pretrain_diffusion.py and test_pretrain_flow.py, which regenerate the
saved samples pixel for pixel."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from alignjax import testing
from alignjax.diffusion import digits_training as dt
from alignjax.diffusion import schedules
from alignjax.models import classifier as classifier_lib
from alignjax.models import unet as unet_lib


def test_diffusion_loss_formula():
  schedule = schedules.make_schedule("linear")
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4096, 2, 2, 1)), jnp.float32)
  cond = jnp.zeros((4096,), jnp.int32)
  key = jax.random.key(0)

  def exact(x_t, t, c):  # inverts eq. 1's x_t with the known x0: loss must vanish
    abar = schedule.alphas_cumprod[t][:, None, None, None]
    return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)

  loss = dt.diffusion_loss(exact, schedule, x0, cond, key, p_uncond=0.0, null_class=10)
  assert float(loss) < 1e-6
  # eps_fn = 1[c~ is null]: E (eps - m)^2 = 1 + p_uncond (eps ~ N(0, 1), m ~ Bernoulli(p)).
  is_null = lambda x_t, t, c: jnp.broadcast_to((c == 10)[:, None, None, None], x_t.shape) * 1.0
  loss = dt.diffusion_loss(is_null, schedule, x0, cond, key, p_uncond=0.3, null_class=10)
  assert abs(float(loss) - 1.3) < 0.05


def test_flow_loss_vanishes_at_the_exact_velocity_and_matches_its_value_at_zero():
  """For data X_1 = a (a point), E[X_1 − X_0 | X_t = x] = (a − x)/(1 − t): the loss (eq. 5)
  vanishes there; for v ≡ 0 it is E‖a − X_0‖²/D = a² + 1 per pixel."""
  a = 0.7
  x1 = jnp.full((4096, 2, 2, 1), a, jnp.float32)
  cond = jnp.zeros((4096,), jnp.int32)
  exact = lambda x, t, c: (a - x) / (1.0 - t)[:, None, None, None]
  loss = dt.flow_loss(exact, x1, cond, jax.random.key(0), p_uncond=0.3, null_class=10)
  assert float(loss) < 1e-6
  zero = lambda x, t, c: jnp.zeros_like(x)
  loss = dt.flow_loss(zero, x1, cond, jax.random.key(1), p_uncond=0.0, null_class=10)
  assert abs(float(loss) - (a**2 + 1)) < 0.03
  # label dropout: the fraction of null ids the model sees is p_uncond
  seen = []
  spy = lambda x, t, c: (seen.append(c), jnp.zeros_like(x))[1]
  dt.flow_loss(spy, x1, cond, jax.random.key(2), p_uncond=0.3, null_class=10)
  assert abs(float(jnp.mean(seen[0] == 10)) - 0.3) < 0.03


def test_ema_update_hand_computed():
  ema, params = {"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}
  # step 0: d = min(0.999, 1/10) = 0.1 -> 0.1 * 1 + 0.9 * 3 = 2.8
  np.testing.assert_allclose(dt.ema_update(ema, params, 0, 0.999)["w"], [2.8], rtol=1e-6)
  # late step: d = 0.5 (the cap) -> 2.0
  np.testing.assert_allclose(dt.ema_update(ema, params, 10_000, 0.5)["w"], [2.0], rtol=1e-6)


def test_objective_and_model_configs():
  c = ml_collections.ConfigDict(
      dict(
          unet=dict(channels=(8,), attention_resolutions=()),
          classifier=dict(channels=(8, 8), hidden_dim=16, num_groups=4),
      )
  )
  assert dt.objective_of(c) == "eps"  # the eps config predates the key
  assert dt.unet_config(c) == unet_lib.UNetConfig(
      channels=(8,),
      attention_resolutions=(),
      image_size=8,
      in_channels=1,
      out_channels=1,
      num_classes=10,
  )
  assert dt.classifier_config(c) == classifier_lib.ClassifierConfig(
      channels=(8, 8), hidden_dim=16, num_groups=4, num_classes=10
  )
  c.unet.widths = 3
  with pytest.raises(ValueError, match="widths"):
    dt.unet_config(c)
  c.objective = "flow"
  assert dt.objective_of(c) == "flow"


def test_init_model_matches_eager_init():
  """One jitted init draws the same weights as building the module op by op."""
  config = classifier_lib.ClassifierConfig(channels=(4, 4), hidden_dim=8, num_groups=2)
  build = lambda rngs: classifier_lib.DigitsClassifier(config, rngs=rngs)
  key = jax.random.key(3)
  got = nnx.state(dt.init_model(build, key))
  want = nnx.state(build(nnx.Rngs(key)))
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_recognition_hand_computed():
  clf = testing.tiny_classifier(seed=0)
  images = np.random.default_rng(0).uniform(0, 1, (30, 8, 8, 1)).astype(np.float32)
  predicted = np.argmax(np.asarray(clf(jnp.asarray(images))), axis=-1)
  cond = np.arange(30, dtype=np.int32) % 10
  cond[:5] = predicted[:5]  # some hits whatever the random classifier says
  rate, per_class = dt.recognition(clf, images, cond)
  assert rate == np.mean(predicted == cond) and rate >= 5 / 30
  assert per_class == [np.mean(predicted[cond == c] == c) for c in range(10)]


def test_samplers_in_batches():
  """Batch i of `cond` samples with fold_in(key, i), the last batch padded and cut back: the
  first batch's samples are those of a call on that batch alone. The flow sampler refuses
  unknown sampler names."""
  unet = testing.tiny_unet(seed=0)
  graphdef, params = nnx.split(unet)
  cond = np.array([3, 1, 4], np.int32)
  key = jax.random.key(0)
  flow_kw = dict(num_steps=2, guidance_scale=2.0, time_scale=1000.0, null_class=10, batch_size=2)
  for sampler in ("ode", "sde"):
    x = dt.sample_digits_flow(graphdef, params, cond, key, sampler=sampler, **flow_kw)
    assert x.shape == (3, 8, 8, 1) and np.all(np.isfinite(x))
    first = dt.sample_digits_flow(graphdef, params, cond[:2], key, sampler=sampler, **flow_kw)
    np.testing.assert_array_equal(x[:2], first)
  with pytest.raises(ValueError, match="sampler='heun'"):
    dt.sample_digits_flow(graphdef, params, cond, key, sampler="heun", **flow_kw)

  schedule = schedules.make_schedule("linear")
  ddim_kw = dict(num_steps=2, eta=1.0, guidance_scale=2.0, clip_sample=1.0, batch_size=2)
  x = dt.sample_digits(graphdef, params, schedule, cond, key, **ddim_kw)
  assert x.shape == (3, 8, 8, 1) and np.all(np.abs(x) <= 1.0)
  first = dt.sample_digits(graphdef, params, schedule, cond[:2], key, **ddim_kw)
  np.testing.assert_array_equal(x[:2], first)
