"""Tests of the digits pretraining script (experiments/pretrain_diffusion.py), its config
and, through a tiny run, alignjax.diffusion.digits_pretraining's pretrain and cache. The
losses and samplers are tested in tests/diffusion/test_digits_training.py."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import nnx
from PIL import Image

from alignjax import metrics
from alignjax.data import digits
from alignjax.diffusion import digits_pretraining as dp
from alignjax.diffusion import digits_training as dt
from alignjax.diffusion import schedules
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib
from experiments import pretrain_diffusion as pd
from experiments.configs.pretrain_diffusion import digits as digits_config

CONFIG_FILE = os.path.join(os.path.dirname(digits_config.__file__), "digits.py")


def test_config_docstring_and_validation():
  assert (
      digits_config.__doc__.lstrip().startswith("Pretrain")
      and "python -m experiments.pretrain_diffusion" in digits_config.__doc__
  )
  config = digits_config.get_config()
  assert config == dp.default_config("eps")  # the values exist once, in the library
  dp.validate(config)
  dp.validate(digits_config.get_config("tiny=True"))
  assert dt.unet_config(config) == unet_lib.UNetConfig(
      channels=tuple(config.unet.channels), attention_resolutions=(2,)
  )
  config.train.p_uncond = 1.5
  with pytest.raises(ValueError, match=r"config.train.p_uncond=1.5"):
    dp.validate(config)
  config = digits_config.get_config()
  config.unet.widths = 3
  with pytest.raises(ValueError, match="widths"):
    dt.unet_config(config)


def regenerated_samples(config, workdir, unet):
  """(images, labels) of the script's first evaluation, drawn again from the saved UNet with
  the script's sample key (the third of three split from the seed) and checked pixel for
  pixel against the sample grid the script saved."""
  sc = config.sample
  cond = np.repeat(np.arange(digits.NUM_CLASSES, dtype=np.int32), sc.per_class)
  sample_key = jax.random.split(jax.random.key(config.seed, impl=config.prng_impl), 3)[2]
  graphdef, params = nnx.split(unet)
  x = dt.sample_digits(
      graphdef,
      params,
      schedules.make_schedule(**config.schedule.to_dict()),
      cond,
      jax.random.fold_in(sample_key, 0),
      num_steps=sc.num_steps,
      eta=sc.eta,
      guidance_scale=sc.guidance_scales[0],
      clip_sample=sc.clip_sample,
      batch_size=sc.batch_size,
  )
  images = digits.to_images(x)
  name = f"samples_w{sc.guidance_scales[0]:g}".replace(".", "_") + f"_{config.train.steps:06d}"
  grid = metrics.image_grid(
      np.concatenate([images[cond == c][:10] for c in range(digits.NUM_CLASSES)]), 10
  )
  saved = np.asarray(Image.open(os.path.join(workdir, "images", f"{name}.png")))
  np.testing.assert_array_equal(saved, np.kron(grid[..., 0], np.ones((4, 4), np.uint8)))
  return images, cond


@pytest.mark.slow
def test_tiny_pretraining_cli_and_cache(tmp_path):
  """Runs the script's command line on a tiny config, loads the outputs, reuses the cache."""
  workdir = str(tmp_path / "cache")
  argv = [
      "prog",
      f"--config={CONFIG_FILE}:tiny=True",
      "--config.sample.num_steps=2",
      f"--workdir={workdir}",
  ]
  fv = flags.FlagValues()
  config_flag, workdir_flag = pd.define_flags(fv, argv)
  fv(argv)
  assert pd.main(["prog"], config_flag, workdir_flag) is None  # exit status 0 under app.run

  with open(os.path.join(workdir, dp.REPORT_NAME)) as f:
    saved = json.load(f)
  assert saved["recognition_rate"] == saved["evaluations"][0]["recognition_rate"]
  assert saved["num_samples"] == 20 and saved["config"]["sample"]["num_steps"] == 2
  assert set(saved["time_s"]) == {"unet_train", "classifier_train", "sampling", "total"}
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))

  unet = model_io.load_model(os.path.join(workdir, "unet"), unet_lib.UNet, unet_lib.UNetConfig)
  assert unet.config.channels == (8,)
  out = unet(jnp.zeros((2, 8, 8, 1)), jnp.array([0, 999]), jnp.array([3, 10]))
  assert out.shape == (2, 8, 8, 1) and np.all(np.isfinite(np.asarray(out)))
  clf = model_io.load_model(
      os.path.join(workdir, "classifier"),
      classifier_lib.DigitsClassifier,
      classifier_lib.ClassifierConfig,
  )
  assert clf(jnp.zeros((1, 8, 8, 1))).shape == (1, 10)

  # The reported figures are those of the saved models, recomputed here by hand. (Four
  # training steps leave the tiny models at chance level, so no margin above chance is asked.)
  config = config_flag.value
  for split in ("test", "train"):
    x, y = digits.load_digits_split(split)
    predicted = np.argmax(np.asarray(clf(jnp.asarray(digits.to_images(x)))), axis=-1)
    assert saved[f"classifier_{split}_accuracy"] == np.mean(predicted == y), split
  images, cond = regenerated_samples(config, workdir, unet)
  predicted = np.argmax(np.asarray(clf(jnp.asarray(images))), axis=-1)
  assert saved["recognition_rate"] == np.mean(predicted == cond)
  assert saved["evaluations"][0]["per_class"] == [
      np.mean(predicted[cond == c] == c) for c in range(digits.NUM_CLASSES)
  ]

  # ensure_pretrained: a valid cache for the same config is reused, not retrained.
  mtime = os.path.getmtime(os.path.join(workdir, dp.REPORT_NAME))
  paths = dp.ensure_pretrained(workdir, config)
  assert paths["unet_dir"] == os.path.join(workdir, "unet")
  assert paths["classifier_dir"] == os.path.join(workdir, "classifier")
  assert schedules.make_schedule(**paths["schedule"]).num_train_timesteps == 1000
  assert os.path.getmtime(os.path.join(workdir, dp.REPORT_NAME)) == mtime
  # ...while another config, or missing weights, makes the cache invalid.
  other = digits_config.get_config("tiny=True")
  assert "different config" in dp._cache_status(workdir, other)
  skip = ml_collections.ConfigDict(config.to_dict())  # an operational field only
  skip.finite.policy = "skip"
  assert dp._cache_status(workdir, skip) is None
  os.remove(os.path.join(workdir, "unet", "model.safetensors"))
  assert "do not load" in dp._cache_status(workdir, config)
