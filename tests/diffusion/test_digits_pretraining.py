"""Tests of alignjax/diffusion/digits_pretraining.py: its default configs, their validation and
the cache directories. A whole (tiny) pretraining, its report and the cache's reuse and
invalidation run in tests/experiments/test_pretrain_diffusion.py and test_pretrain_flow.py."""

import os

import pytest

from alignjax import configs
from alignjax.diffusion import digits_pretraining as dp
from alignjax.diffusion import digits_training as dt
from alignjax.diffusion import schedules


def test_flow_config_is_the_eps_config_with_the_objective_switched():
  eps, flow = dp.default_config("eps"), dp.default_config("flow")
  dp.validate(eps)
  dp.validate(flow)
  assert dp.objective_of(eps) == "eps" and dp.objective_of(flow) == "flow"
  shared = ("seed", "prng_impl", "unet", "finite", "train", "classifier", "classifier_train")
  for key in shared + ("targets",):
    assert flow[key] == eps[key], key
  assert dt.unet_config(flow) == dt.unet_config(eps)
  assert set(eps) - set(flow) == {"schedule"} and set(flow) - set(eps) == {"objective", "flow"}
  assert "eta" not in flow.sample and flow.sample.sampler in dp.FLOW_SAMPLERS
  # the schedule kwargs are make_schedule's
  assert schedules.make_schedule(**eps.schedule.to_dict()).num_train_timesteps == 1000
  with pytest.raises(ValueError, match="objective='score'"):
    dp.default_config("score")


def test_validation_names_the_key():
  config = dp.default_config()
  config.train.p_uncond = 1.5
  with pytest.raises(ValueError, match=r"config.train.p_uncond=1.5"):
    dp.validate(config)
  config = dp.default_config()
  config.sample.guidance_scales = ()
  with pytest.raises(configs.ConfigError, match="at least one scale"):
    dp.validate(config)
  config = dp.default_config()
  config.sample.guidance_scales = (2.0, -1.0)
  with pytest.raises(configs.ConfigError, match=r"guidance_scales\[1\]=-1.0"):
    dp.validate(config)
  config = dp.default_config()
  config.prng_impl = "philox"
  with pytest.raises(configs.ConfigError, match="config.prng_impl"):
    dp.validate(config)
  config = dp.default_config("flow")
  config.sample.sampler = "heun"
  with pytest.raises(configs.ConfigError, match=r"config.sample.sampler"):
    dp.validate(config)
  config = dp.default_config("flow")
  config.objective = "score"
  with pytest.raises(configs.ConfigError, match=r"config.objective.*'eps', 'flow'"):
    dp.validate(config)
  config = dp.default_config("flow")
  config.flow.time_scale = 0.0
  with pytest.raises(configs.ConfigError, match=r"config.flow.time_scale=0.0"):
    dp.validate(config)


def test_flow_cache_is_a_subdirectory_of_the_eps_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("ALIGNJAX_CACHE", str(tmp_path / "digits"))
  assert dp.default_cache_dir() == str(tmp_path / "digits")
  assert dp.default_cache_dir("flow") == str(tmp_path / "digits" / dp.FLOW_SUBDIR)
  assert dp.FLOW_SUBDIR == "flow"  # the layout of caches made before
  with pytest.raises(ValueError, match="objective"):
    dp.default_cache_dir("score")
  monkeypatch.delenv("ALIGNJAX_CACHE")
  home = os.path.expanduser("~")
  assert dp.default_cache_dir() == os.path.join(home, ".cache", "alignjax", "digits")


def test_cache_status_reasons(tmp_path):
  """What makes a cache invalid before any model is loaded (the loading is tested with a real
  pretraining in tests/experiments)."""
  config = dp.default_config()
  assert dp._cache_status(str(tmp_path), config).startswith("no ")
  (tmp_path / dp.REPORT_NAME).write_text("{not json")
  assert dp._cache_status(str(tmp_path), config).startswith("unreadable ")
  (tmp_path / dp.REPORT_NAME).write_text('{"config": ' + dp.default_config("flow").to_json() + "}")
  assert "different config" in dp._cache_status(str(tmp_path), config)
  (tmp_path / dp.REPORT_NAME).write_text('{"config": ' + config.to_json() + "}")
  assert "do not load" in dp._cache_status(str(tmp_path), config)
