"""experiments/ddpo.py on Stable Diffusion: the sd15 config at its tiny size, through the same
script as the digits model, on a tiny random diffusers pipeline written by the test."""

import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from alignjax import configs, metrics, training
from alignjax.models.convert import sd_pipeline
from alignjax.rewards import configured
from experiments import ddpo as ddpo_script
from experiments.configs.ddpo import sd15


def sd_config(model_dir, **overrides):
  config = sd15.get_config(overrides.pop("arg", "tiny=True"))
  config.model.path = model_dir
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[name] = value
  return config


def records(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r for r in rows if "approx_kl" in r}


@pytest.mark.slow
def test_tiny_sd_lora_run_trains_and_exports_a_diffusers_unet(tmp_path, tiny_sd_dir):
  config = sd_config(tiny_sd_dir, arg="tiny=True,reward=compressibility")
  result = ddpo_script.run(config, str(tmp_path))
  assert np.isfinite(result["base_reward"]) and np.isfinite(result["final_reward"])
  rows = records(tmp_path)
  assert sorted(rows) == [1, 2]
  for r in rows.values():
    assert all(np.isfinite(r[k]) for k in ("reward_mean", "approx_kl", "loss", "ratio_mean"))
  assert rows[1]["on_policy_ratio_error"] < 1e-3
  # LoRA factors on the attention projections only, moved away from their initial values
  sd = sd_pipeline.load_stable_diffusion(tiny_sd_dir)
  finetune = training.Finetune.from_config(config.finetune)
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  from alignjax.models.convert import diffusers_lora

  initial = jax.device_get(
      finetune.split(nnx.state(sd.unet), init_key, (diffusers_lora.unet_lora_target(), None))[0]
  )
  trained = jax.device_get(result["params"])
  assert trained.keys() == initial.keys() and trained
  assert all(("attn1" in k or "attn2" in k) for k in trained)
  for k in trained:
    np.testing.assert_array_equal(initial[k]["b"], 0.0)
    assert np.abs(trained[k]["b"]).max() > 0, k
  # the merged model is a diffusers UNet2DConditionModel directory
  theirs = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "final_model"))
  x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
  ctx = np.random.default_rng(1).normal(size=(1, 12, 32)).astype(np.float32)
  with torch.no_grad():
    out = theirs(torch.from_numpy(x), 500, torch.from_numpy(ctx)).sample.numpy()
  merged = nnx.merge(nnx.graphdef(sd.unet), finetune.params(trained, nnx.state(sd.unet)))
  ours = merged(x.transpose(0, 2, 3, 1), np.array([500]), ctx)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), out, atol=1e-4)
  base = sd.unet(x.transpose(0, 2, 3, 1), np.array([500]), ctx)
  assert np.abs(np.asarray(ours) - np.asarray(base)).max() > 0  # the fine-tuning is in it


@pytest.mark.slow
def test_tiny_sd_full_finetune_on_the_aesthetic_reward(tmp_path, tiny_sd_dir, tiny_clip_dir):
  config = sd_config(
      tiny_sd_dir,
      arg="tiny=True,reward=aesthetic,finetune=full",
      **{
          "num_rounds": 1,
          "reward.model_dir": tiny_clip_dir,
          "reward.mlp_path": os.path.join(tiny_clip_dir, "aesthetic_mlp.safetensors"),
      },
  )
  result = ddpo_script.run(config, str(tmp_path))
  assert np.isfinite(result["final_reward"])
  base = jax.device_get(nnx.state(sd_pipeline.load_stable_diffusion(tiny_sd_dir).unet))
  moved = jax.tree_util.tree_map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), result["params"], base
  )
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  assert (tmp_path / "summary.md").read_text().count("aesthetic") == 1


def test_sd_bad_input_names_the_key_or_file(tmp_path, tiny_sd_dir):
  with pytest.raises(configs.ConfigError, match="config.model.path='/nonexistent'"):
    ddpo_script.run(sd_config("/nonexistent"), str(tmp_path / "a"))
  with pytest.raises(configs.ConfigError, match="is not a reward of the stable_diffusion|one of"):
    ddpo_script.run(sd_config(tiny_sd_dir, **{"reward.name": "classifier"}), str(tmp_path / "b"))
  config = sd_config(tiny_sd_dir, arg="tiny=True,reward=aesthetic")
  with pytest.raises(configured.RewardConfigError, match="config.reward.model_dir is empty"):
    ddpo_script.run(config, str(tmp_path / "c"))
  empty = tmp_path / "prompts.txt"
  empty.write_text("\n\n")
  config = sd_config(
      tiny_sd_dir, arg="tiny=True,reward=compressibility", **{"prompts.file": str(empty)}
  )
  with pytest.raises(Exception, match="prompts.txt"):
    ddpo_script.run(config, str(tmp_path / "d"))
  config = sd_config(tiny_sd_dir, arg="tiny=True,reward=compressibility", **{"mesh.tensor": 2})
  with pytest.raises(configs.ConfigError, match="mesh.tensor=2"):
    ddpo_script.run(config, str(tmp_path / "e"))
  assert not os.listdir(tmp_path / "a") if (tmp_path / "a").exists() else True
