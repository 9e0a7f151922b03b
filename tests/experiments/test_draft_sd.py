"""experiments/draft.py on Stable Diffusion: the sd15 config at its tiny size, through the same
script as the digits model, on a tiny random diffusers pipeline and a tiny CLIP aesthetic
reward written by the test session."""

import os

import diffusers
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from alignjax import configs, metrics, training
from alignjax.models.convert import diffusers_lora, sd_pipeline
from experiments import draft as draft_script
from experiments.configs.draft import sd15


def sd_config(model_dir, clip_dir="", arg="tiny=True", **overrides):
  config = sd15.get_config(arg)
  config.model.path = model_dir
  if clip_dir:
    config.reward.model_dir = clip_dir
    config.reward.mlp_path = os.path.join(clip_dir, "aesthetic_mlp.safetensors")
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[name] = value
  return config


@pytest.mark.slow
def test_tiny_sd_draft_k_lora_on_the_aesthetic_reward(tmp_path, tiny_sd_dir, tiny_clip_dir):
  config = sd_config(tiny_sd_dir, tiny_clip_dir, arg="tiny=True,variant=k10")
  assert (config.draft.variant, config.draft.truncation_k) == ("k", 2)
  result = draft_script.run(config, str(tmp_path))
  assert np.isfinite(result["base"]["reward_mean"]) and np.isfinite(result["final"]["reward_mean"])
  rows = {
      r["step"]: r
      for r in metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
      if "grad_norm" in r
  }
  assert sorted(rows) == [1, 2]
  for r in rows.values():
    for k in ("reward_mean", "loss", "grad_norm"):
      assert np.isfinite(r[k]), k
    # NaN when no prompt occurs twice among the 8 (of 45 prompts): no pair to measure
    assert np.isnan(r["diversity"]) or r["diversity"] >= 0
    assert r["grad_norm"] > 0 and r["reward_queries"] % 8 == 0
  assert "DRaFT-K (K=2), lora" in (tmp_path / "summary.md").read_text()
  # LoRA factors on the attention projections only, their B factors moved away from 0
  sd = sd_pipeline.load_stable_diffusion(tiny_sd_dir)
  finetune = training.Finetune.from_config(config.finetune)
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  initial = jax.device_get(
      finetune.split(nnx.state(sd.unet), init_key, (diffusers_lora.unet_lora_target(), None))[0]
  )
  trained = jax.device_get(result["params"])
  assert trained and trained.keys() == initial.keys()
  assert all(("attn1" in k or "attn2" in k) for k in trained)
  for k in trained:
    np.testing.assert_array_equal(initial[k]["b"], 0.0)
  assert max(float(np.abs(v["b"]).max()) for v in trained.values()) > 0
  # the merged model is a diffusers UNet2DConditionModel directory that holds the fine-tuning
  theirs = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "final_model"))
  x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
  ctx = np.random.default_rng(1).normal(size=(1, 12, 32)).astype(np.float32)
  with torch.no_grad():
    out = theirs(torch.from_numpy(x), 500, torch.from_numpy(ctx)).sample.numpy()
  merged = nnx.merge(nnx.graphdef(sd.unet), finetune.params(trained, nnx.state(sd.unet)))
  ours = merged(x.transpose(0, 2, 3, 1), np.array([500]), ctx)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), out, atol=1e-4)


def test_sd_refuses_a_reward_it_cannot_differentiate(tmp_path, tiny_sd_dir):
  config = sd_config(tiny_sd_dir, **{"reward.name": "jpeg_compressibility"})
  with pytest.raises(
      configs.ConfigError,
      match=r"config.reward.name='jpeg_compressibility': must be one of 'aesthetic'",
  ):
    draft_script.run(config, str(tmp_path / "a"))
  assert draft_script.differentiable_rewards(config) == (
      "aesthetic",
      "clip_score",
      "clip_preference",
      "brightness",
  )
  assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")
