"""experiments/adjoint_matching.py on Stable Diffusion: the sd15 config at its tiny size, through
the same script as the digits model, on a tiny random diffusers pipeline written by the test."""

import json
import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from alignjax import configs, metrics, training
from alignjax.models.convert import diffusers_lora, sd_pipeline
from experiments import adjoint_matching as am_script
from experiments.configs.adjoint_matching import sd15


def sd_config(model_dir, arg="tiny=True", **overrides):
  config = sd15.get_config(arg)
  config.model.path = model_dir
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[name] = value
  return config


def test_config_docstring_and_variants():
  doc = sd15.__doc__.lstrip()
  assert doc.startswith("Adjoint Matching") and "python -m experiments.adjoint_matching" in doc
  assert sd15.get_config().reward.name == "clip_preference"
  assert sd15.get_config("reward=aesthetic").reward.name == "aesthetic"
  assert sd15.get_config().model.kind == "eps"
  with pytest.raises(configs.ConfigError, match="reward='jpeg'"):
    sd15.get_config("reward=jpeg")


@pytest.mark.slow
def test_tiny_sd_lora_run_on_the_aesthetic_reward(tmp_path, tiny_sd_dir, tiny_clip_dir):
  config = sd_config(
      tiny_sd_dir,
      "tiny=True,reward=aesthetic",
      **{
          "reward.model_dir": tiny_clip_dir,
          "reward.mlp_path": os.path.join(tiny_clip_dir, "aesthetic_mlp.safetensors"),
      },
  )
  result = am_script.run(config, str(tmp_path))
  for r in (result["base"], result["final"]):
    assert np.isfinite(r["reward"]) and "recognition" not in r
  records = [r for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "grad_norm" in r]
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert all(np.isfinite(r[k]) for k in ("loss", "reward", "grad_norm", "residual"))
    assert r["grad_norm"] > 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["reward"] == "aesthetic" and summary["model"] == "eps"
  assert "recognition" not in (tmp_path / "summary.md").read_text()
  # LoRA factors on the attention projections only, moved away from zero
  sd = sd_pipeline.load_stable_diffusion(tiny_sd_dir)
  finetune = training.Finetune.from_config(config.finetune)
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  initial = jax.device_get(
      finetune.split(nnx.state(sd.unet), init_key, (diffusers_lora.unet_lora_target(), None))[0]
  )
  trained = jax.device_get(result["params"])
  assert trained.keys() == initial.keys() and trained
  assert all(("attn1" in k or "attn2" in k) for k in trained)
  for k in trained:
    np.testing.assert_array_equal(initial[k]["b"], 0.0)
    assert np.abs(trained[k]["b"]).max() > 0, k
  # the merged model is a diffusers UNet2DConditionModel directory holding the fine-tuning
  theirs = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "final_model"))
  x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
  ctx = np.random.default_rng(1).normal(size=(1, 12, 32)).astype(np.float32)
  with torch.no_grad():
    out = theirs(torch.from_numpy(x), 500, torch.from_numpy(ctx)).sample.numpy()
  merged = nnx.merge(nnx.graphdef(sd.unet), finetune.params(trained, nnx.state(sd.unet)))
  ours = merged(x.transpose(0, 2, 3, 1), np.array([500]), ctx)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), out, atol=1e-4)
  base = sd.unet(x.transpose(0, 2, 3, 1), np.array([500]), ctx)
  assert np.abs(np.asarray(ours) - np.asarray(base)).max() > 0


def test_sd_refuses_flow_and_host_rewards_before_loading(tmp_path, tiny_sd_dir):
  with pytest.raises(configs.ConfigError, match="config.model.kind='flow'"):
    am_script.run(sd_config(tiny_sd_dir, **{"model.kind": "flow"}), str(tmp_path / "a"))
  config = sd_config(tiny_sd_dir, **{"reward.name": "jpeg_compressibility"})
  with pytest.raises(configs.ConfigError, match="Adjoint Matching needs ∇r.*'aesthetic'"):
    am_script.run(config, str(tmp_path / "b"))
  assert not (tmp_path / "a" / "checkpoints").exists()
