"""The flow-matching objective of experiments/pretrain_diffusion.py (config digits_flow.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from PIL import Image

from alignjax import configs, metrics
from alignjax.data import digits
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib
from experiments import pretrain_diffusion as pd
from experiments.configs.pretrain_diffusion import digits as digits_config
from experiments.configs.pretrain_diffusion import digits_flow

CONFIG_FILE = os.path.join(os.path.dirname(digits_flow.__file__), "digits_flow.py")


def test_flow_loss_vanishes_at_the_exact_velocity_and_matches_its_value_at_zero():
  """For data X_1 = a (a point), E[X_1 − X_0 | X_t = x] = (a − x)/(1 − t): the loss (eq. 5)
  vanishes there; for v ≡ 0 it is E‖a − X_0‖²/D = a² + 1 per pixel."""
  a = 0.7
  x1 = jnp.full((4096, 2, 2, 1), a, jnp.float32)
  cond = jnp.zeros((4096,), jnp.int32)
  exact = lambda x, t, c: (a - x) / (1.0 - t)[:, None, None, None]
  loss = pd.flow_loss(exact, x1, cond, jax.random.key(0), p_uncond=0.3, null_class=10)
  assert float(loss) < 1e-6
  zero = lambda x, t, c: jnp.zeros_like(x)
  loss = pd.flow_loss(zero, x1, cond, jax.random.key(1), p_uncond=0.0, null_class=10)
  assert abs(float(loss) - (a**2 + 1)) < 0.03
  # label dropout: the fraction of null ids the model sees is p_uncond
  seen = []
  spy = lambda x, t, c: (seen.append(c), jnp.zeros_like(x))[1]
  pd.flow_loss(spy, x1, cond, jax.random.key(2), p_uncond=0.3, null_class=10)
  assert abs(float(jnp.mean(seen[0] == 10)) - 0.3) < 0.03


def test_unet_time_input_and_guidance():
  tau_fn = lambda x, tau, c: jnp.broadcast_to(tau[:, None, None, None], x.shape)
  t = jnp.array([0.0, 0.25, 1.0])
  x = jnp.zeros((3, 2, 2, 1))
  got = pd.unet_velocity(tau_fn, 1000.0)(x, t, jnp.zeros(3, jnp.int32))
  np.testing.assert_allclose(got[:, 0, 0, 0], [1000.0, 750.0, 0.0])  # eq. 4

  # v(x, t, c) = c + t: guided = v_null + w (v_c − v_null) (eq. 6)
  vel = lambda x, t, c: jnp.broadcast_to((c + t)[:, None, None, None], x.shape).astype(x.dtype)
  cond = jnp.array([1, 2, 3], jnp.int32)
  guided = pd.guided_velocity(vel, 2.5, 10)(x, t, cond)
  want = (10 + t) + 2.5 * ((cond + t) - (10 + t))
  np.testing.assert_allclose(guided[:, 0, 0, 0], want, rtol=1e-6)
  assert pd.guided_velocity(vel, 1.0, 10) is vel


def test_config_docstring_and_validation():
  assert "python -m experiments.pretrain_diffusion" in digits_flow.__doc__
  config = digits_flow.get_config()
  pd.validate(config)
  eps = digits_config.get_config()
  assert config.unet == eps.unet and config.train == eps.train  # the same UNet and training
  assert pd.unet_config(config) == pd.unet_config(eps)
  config.sample.sampler = "heun"
  with pytest.raises(configs.ConfigError, match=r"config.sample.sampler"):
    pd.validate(config)
  config = digits_flow.get_config()
  config.objective = "score"
  with pytest.raises(configs.ConfigError, match=r"config.objective.*'eps', 'flow'"):
    pd.validate(config)
  config = digits_flow.get_config()
  config.flow.time_scale = 0.0
  with pytest.raises(configs.ConfigError, match=r"config.flow.time_scale=0.0"):
    pd.validate(config)


def test_flow_cache_is_a_subdirectory_of_the_eps_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("ALIGNJAX_CACHE", str(tmp_path / "digits"))
  assert pd.default_cache_dir() == str(tmp_path / "digits")
  assert pd.default_cache_dir("flow") == str(tmp_path / "digits" / "flow")
  with pytest.raises(ValueError, match="objective"):
    pd.default_cache_dir("score")


def regenerated_flow_samples(config, workdir, unet):
  """(images, labels) of the script's first evaluation, drawn again from the saved UNet with
  the script's sample key (the third of three split from the seed) and checked pixel for
  pixel against the sample grid the script saved."""
  sc = config.sample
  cond = np.repeat(np.arange(digits.NUM_CLASSES, dtype=np.int32), sc.per_class)
  sample_key = jax.random.split(jax.random.key(config.seed, impl=config.prng_impl), 3)[2]
  graphdef, params = nnx.split(unet)
  x = pd.sample_digits_flow(
      graphdef,
      params,
      cond,
      jax.random.fold_in(sample_key, 0),
      num_steps=sc.num_steps,
      sampler=sc.sampler,
      guidance_scale=sc.guidance_scales[0],
      time_scale=config.flow.time_scale,
      null_class=unet.config.null_class,
      batch_size=sc.batch_size,
  )
  images = digits.to_images(x)
  name = f"samples_w{sc.guidance_scales[0]:g}".replace(".", "_") + f"_{config.train.steps:06d}"
  grid = metrics.image_grid(
      np.concatenate([images[cond == c][:10] for c in range(digits.NUM_CLASSES)]), 10
  )
  saved = np.asarray(Image.open(workdir / "images" / f"{name}.png"))
  np.testing.assert_array_equal(saved, np.kron(grid[..., 0], np.ones((4, 4), np.uint8)))
  return images, cond


def test_tiny_flow_pretraining_cli_and_cache(tmp_path, monkeypatch):
  """The script's command line on the tiny flow config, with no --workdir: the models go to
  the flow cache, next to (not over) an eps cache; ensure_pretrained reuses them."""
  monkeypatch.setenv("ALIGNJAX_CACHE", str(tmp_path / "digits"))
  argv = ["prog", f"--config={CONFIG_FILE}:tiny=True", "--config.sample.sampler=sde"]
  fv = flags.FlagValues()
  config_flag, workdir_flag = pd.define_flags(fv, argv)
  fv(argv)
  assert pd.main(["prog"], config_flag, workdir_flag) is None
  workdir = tmp_path / "digits" / "flow"
  saved = json.loads((workdir / pd.REPORT_NAME).read_text())
  assert saved["config"]["objective"] == "flow" and saved["schedule"] is None
  assert saved["evaluations"][0]["sampler"] == "sde" and "eta" not in saved["evaluations"][0]
  assert saved["num_samples"] == 20
  assert not (tmp_path / "digits" / pd.REPORT_NAME).exists()  # the eps cache is untouched

  unet = model_io.load_model(str(workdir / "unet"), unet_lib.UNet, unet_lib.UNetConfig)
  out = pd.unet_velocity(unet, 1000.0)(
      jnp.zeros((2, 8, 8, 1)), jnp.array([0.0, 0.5]), jnp.array([3, 10])
  )
  assert out.shape == (2, 8, 8, 1) and np.all(np.isfinite(np.asarray(out)))

  # The reported recognition rate is that of the saved models, recomputed here by hand on the
  # script's samples drawn again (the tiny models are at chance level: no margin is asked).
  config = config_flag.value
  clf = model_io.load_model(
      str(workdir / "classifier"), classifier_lib.DigitsClassifier, classifier_lib.ClassifierConfig
  )
  images, cond = regenerated_flow_samples(config, workdir, unet)
  predicted = np.argmax(np.asarray(clf(jnp.asarray(images))), axis=-1)
  assert saved["recognition_rate"] == np.mean(predicted == cond)
  assert saved["evaluations"][0]["per_class"] == [
      np.mean(predicted[cond == c] == c) for c in range(digits.NUM_CLASSES)
  ]

  mtime = os.path.getmtime(workdir / pd.REPORT_NAME)
  paths = pd.ensure_pretrained(None, config)  # default: the flow cache
  assert paths["unet_dir"] == str(workdir / "unet") and paths["schedule"] is None
  assert os.path.getmtime(workdir / pd.REPORT_NAME) == mtime
  assert "different config" in pd._cache_status(str(workdir), digits_flow.get_config("tiny=True"))
