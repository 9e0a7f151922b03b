"""Noise schedules against diffusers' DDPMScheduler/DDIMScheduler and eq. 5 re-derived."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler

from alignjax.diffusion import schedules

# (alignjax kind, diffusers beta_schedule, beta_start, beta_end)
CASES = [
    ("linear", "linear", 1e-4, 0.02),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),  # Stable Diffusion's values
    ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
]


@pytest.mark.parametrize("kind,hf_kind,beta_start,beta_end", CASES)
@pytest.mark.parametrize("n", [1000, 50, 7])
def test_schedule_equals_diffusers(kind, hf_kind, beta_start, beta_end, n):
  ours = schedules.make_schedule(kind, n, beta_start, beta_end)
  for cls in (DDPMScheduler, DDIMScheduler):
    ref = cls(
        num_train_timesteps=n, beta_start=beta_start, beta_end=beta_end, beta_schedule=hf_kind
    )
    for name in ("betas", "alphas", "alphas_cumprod"):
      got, want = np.asarray(getattr(ours, name)), getattr(ref, name).numpy()
      assert got.dtype == np.float32 and got.shape == (n,)
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{cls.__name__}.{name}")
  assert ours.num_train_timesteps == n


def test_cosine_betas_by_hand():
  # eq. 3 at t = 0 and the cap at the last step, computed here from the formula.
  n = 10
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = np.asarray(schedules.make_schedule("cosine", n).betas)
  np.testing.assert_allclose(betas[0], 1 - f(0.1) / f(0.0), rtol=1e-6)
  assert betas[-1] == np.float32(0.999)  # f(1) = cos^2(pi/2) ~ 0 -> beta capped
  assert schedules.make_schedule("squaredcos_cap_v2", n).betas.tolist() == betas.tolist()


def test_final_alpha_cumprod():
  s = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  assert float(s.final_alpha_cumprod) == 1.0
  s0 = schedules.make_schedule("scaled_linear", 1000, 0.00085, 0.012, set_alpha_to_one=False)
  ref = DDIMScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False
  )
  np.testing.assert_allclose(
      float(s0.final_alpha_cumprod), float(ref.final_alpha_cumprod), atol=1e-7
  )
  t = jnp.array([-20, 0, 999])
  np.testing.assert_allclose(
      schedules.alpha_cumprod_at(s0, t),
      [s0.alphas_cumprod[0], s0.alphas_cumprod[0], s0.alphas_cumprod[999]],
  )
  assert float(schedules.alpha_cumprod_at(s, -1)) == 1.0
  # steps_offset is static metadata: not a leaf, kept through jit.
  s1 = schedules.make_schedule("linear", 1000, steps_offset=1)
  assert len(jax.tree_util.tree_leaves(s1)) == 4
  assert jax.jit(lambda s: s)(s1).steps_offset == 1


def test_add_noise_formula_and_diffusers():
  s = schedules.make_schedule("linear", 1000)
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 500, 999], np.int32)
  got = np.asarray(jax.jit(schedules.add_noise)(s, x0, noise, t))
  # eq. 5 in float64 from the float64 alpha products.
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
  np.testing.assert_allclose(got, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, atol=2e-6)
  import torch

  ref = (
      DDPMScheduler()
      .add_noise(
          torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t.astype(np.int64))
      )
      .numpy()
  )
  np.testing.assert_allclose(got, ref, atol=2e-6)
  # A scalar timestep broadcasts over the batch.
  np.testing.assert_allclose(schedules.add_noise(s, x0, noise, 500)[1], got[1], atol=1e-7)
  with pytest.raises(ValueError, match="noise shape"):
    schedules.add_noise(s, x0, noise[:2], t)


@pytest.mark.parametrize(
    "n,steps,offset",
    [
        (1000, 50, 0),
        (1000, 30, 0),
        (1000, 1, 0),
        (1000, 1000, 0),
        (100, 7, 0),
        (10, 3, 0),
        (1, 1, 0),
        (1000, 50, 1),
        (1000, 30, 5),
        (100, 7, 2),
    ],
)
def test_inference_timesteps_equal_diffusers(n, steps, offset):
  ref = DDIMScheduler(num_train_timesteps=n, steps_offset=offset)
  ref.set_timesteps(steps)
  got = schedules.inference_timesteps(n, steps, offset)
  assert got.dtype == np.int32 and got.shape == (steps,)
  np.testing.assert_array_equal(got, ref.timesteps.numpy())
  # prev = t - N // steps, as diffusers' DDIM step computes it (eq. 6).
  np.testing.assert_array_equal(
      schedules.inference_prev_timesteps(n, steps, offset), ref.timesteps.numpy() - n // steps
  )


def test_inference_timesteps_example():
  ts = schedules.inference_timesteps(1000, 50)
  assert ts[0] == 980 and ts[1] == 960 and ts[-1] == 0
  assert schedules.inference_prev_timesteps(1000, 50)[-1] == -20


def test_bad_inputs():
  with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
    schedules.make_schedule("sigmoid")
  with pytest.raises(ValueError, match="num_train_timesteps=0"):
    schedules.make_schedule("linear", 0)
  with pytest.raises(ValueError, match="beta_start"):
    schedules.make_schedule("linear", 10, 0.5, 0.1)
  with pytest.raises(
      ValueError, match="num_steps=51: must be between 1 and " "num_train_timesteps=50"
  ):
    schedules.inference_timesteps(50, 51)
  with pytest.raises(ValueError, match="num_steps=0"):
    schedules.inference_timesteps(1000, 0)
  with pytest.raises(ValueError, match="num_steps=-3"):
    schedules.inference_prev_timesteps(1000, -3)
  with pytest.raises(TypeError, match="num_steps=2.5"):
    schedules.inference_timesteps(1000, 2.5)
  with pytest.raises(ValueError, match="steps_offset=1: the first of num_steps=1000"):
    schedules.inference_timesteps(1000, 1000, 1)
  with pytest.raises(ValueError, match="steps_offset=-1"):
    schedules.make_schedule("linear", 10, steps_offset=-1)
