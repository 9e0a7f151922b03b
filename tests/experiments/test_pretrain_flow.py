"""The flow-matching objective of experiments/pretrain_diffusion.py (config digits_flow.py);
its losses and samplers are tested in tests/diffusion/test_digits_training.py."""

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
from alignjax.diffusion import flow
from alignjax.diffusion import digits_pretraining as dp
from alignjax.diffusion import digits_training as dt
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib
from experiments import pretrain_diffusion as pd
from experiments.configs.pretrain_diffusion import digits as digits_config
from experiments.configs.pretrain_diffusion import digits_flow

CONFIG_FILE = os.path.join(os.path.dirname(digits_flow.__file__), "digits_flow.py")


def test_config_docstring_and_validation():
  assert "python -m experiments.pretrain_diffusion" in digits_flow.__doc__
  config = digits_flow.get_config()
  assert config == dp.default_config("flow")  # the values exist once, in the library
  dp.validate(config)
  dp.validate(digits_flow.get_config("tiny=True"))
  eps = digits_config.get_config()
  assert config.unet == eps.unet and config.train == eps.train  # the same UNet and training
  assert dt.unet_config(config) == dt.unet_config(eps)
  config.sample.sampler = "heun"
  with pytest.raises(configs.ConfigError, match=r"config.sample.sampler"):
    dp.validate(config)
  config = digits_flow.get_config()
  config.objective = "score"
  with pytest.raises(configs.ConfigError, match=r"config.objective.*'eps', 'flow'"):
    dp.validate(config)
  config = digits_flow.get_config()
  config.flow.time_scale = 0.0
  with pytest.raises(configs.ConfigError, match=r"config.flow.time_scale=0.0"):
    dp.validate(config)


def regenerated_flow_samples(config, workdir, unet):
  """(images, labels) of the script's first evaluation, drawn again from the saved UNet with
  the script's sample key (the third of three split from the seed) and checked pixel for
  pixel against the sample grid the script saved."""
  sc = config.sample
  cond = np.repeat(np.arange(digits.NUM_CLASSES, dtype=np.int32), sc.per_class)
  sample_key = jax.random.split(jax.random.key(config.seed, impl=config.prng_impl), 3)[2]
  graphdef, params = nnx.split(unet)
  x = dt.sample_digits_flow(
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
  saved = json.loads((workdir / dp.REPORT_NAME).read_text())
  assert saved["config"]["objective"] == "flow" and saved["schedule"] is None
  assert saved["evaluations"][0]["sampler"] == "sde" and "eta" not in saved["evaluations"][0]
  assert saved["num_samples"] == 20
  assert not (tmp_path / "digits" / dp.REPORT_NAME).exists()  # the eps cache is untouched

  unet = model_io.load_model(str(workdir / "unet"), unet_lib.UNet, unet_lib.UNetConfig)
  out = flow.unet_velocity(unet, 1000.0)(
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

  mtime = os.path.getmtime(workdir / dp.REPORT_NAME)
  paths = dp.ensure_pretrained(None, config)  # default: the flow cache
  assert paths["unet_dir"] == str(workdir / "unet") and paths["schedule"] is None
  assert os.path.getmtime(workdir / dp.REPORT_NAME) == mtime
  assert "different config" in dp._cache_status(str(workdir), digits_flow.get_config("tiny=True"))
