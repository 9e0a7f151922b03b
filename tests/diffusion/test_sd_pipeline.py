"""The Stable Diffusion pipeline against diffusers' StableDiffusionPipeline on a tiny random
pipeline written to disk (no downloads), and the pipeline directory loader's refusals."""

import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alignjax.diffusion import pipeline
from alignjax.models.convert import sd_pipeline
from alignjax.models.convert.safetensors_io import CheckpointError

PROMPTS = ["lower newer", "lowest", "wider lower"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pipes(request, tmp_path_factory, tiny_sd_pipeline):
  directory = str(tmp_path_factory.mktemp("sd"))
  theirs = tiny_sd_pipeline(directory, prediction_type=request.param)
  return theirs, sd_pipeline.load_stable_diffusion(directory), directory


def _epsilon_only(sd):
  if sd.prediction_type != "epsilon":
    pytest.skip("independent of the prediction type: run once")


@pytest.mark.slow
def test_images_equal_diffusers_pipeline(pipes):
  theirs, ours, _ = pipes
  latents = np.random.default_rng(0).normal(size=(3, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    want = theirs(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=5.0,
        eta=0.0,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
  config = pipeline.SamplingConfig(num_steps=4, guidance_scale=5.0)
  generate = pipeline.make_generate(ours, config)
  ids = pipeline.tokenize(ours, PROMPTS)
  images, traj = generate(ids, jax.random.key(0), jnp.asarray(latents.transpose(0, 2, 3, 1)))
  assert images.shape == want.shape == (3, 16, 16, 3)
  assert traj.latents.shape == (3, 5, 8, 8, 4)
  # Four guided UNet calls and a VAE decode in float32: differences stay at rounding level.
  np.testing.assert_allclose(np.asarray(images), want, atol=2e-4)
  assert float(np.std(want)) > 0.01  # the images are not constant

  if ours.prediction_type != "epsilon":
    return
  # bfloat16 compute with float32 master weights stays close to the float32 images.
  bf16 = pipeline.make_generate(ours, pipeline.SamplingConfig(4, 5.0, compute_dtype="bfloat16"))
  images16, _ = bf16(ids, jax.random.key(0), jnp.asarray(latents.transpose(0, 2, 3, 1)))
  assert images16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(images16 - images))) < 0.1


def test_text_embeddings_and_clip_skip_equal_diffusers(pipes):
  theirs, ours, _ = pipes
  _epsilon_only(ours)
  ids = pipeline.tokenize(ours, PROMPTS)
  want_ids = theirs.tokenizer(
      PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="np"
  ).input_ids
  np.testing.assert_array_equal(ids, want_ids)
  tids = torch.from_numpy(ids.astype(np.int64))
  with torch.no_grad():
    want_last, _ = theirs.encode_prompt(PROMPTS, "cpu", 1, False)
    # clip_skip = 1 as encode_prompt defines it: the final layer norm of hidden_states[-2]
    # (written out: diffusers reaches the norm through `text_model`, which transformers 5's
    # CLIPTextModel no longer has).
    hidden = theirs.text_encoder(tids, output_hidden_states=True).hidden_states[-2]
    tower = getattr(theirs.text_encoder, "text_model", theirs.text_encoder)
    want_skip = tower.final_layer_norm(hidden)
  for clip_skip, want in ((None, want_last), (1, want_skip)):
    got = pipeline.encode_text(ours.text_encoder, jnp.asarray(ids), clip_skip)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def _edit(src, dst, path, edit):
  shutil.copytree(src, dst)
  target = os.path.join(dst, path)
  with open(target) as f:
    d = json.load(f)
  edit(d)
  with open(target, "w") as f:
    json.dump(d, f)
  return dst


def test_bad_directories_are_named(pipes, tmp_path):
  _, ours, directory = pipes
  _epsilon_only(ours)
  with pytest.raises(CheckpointError, match="no model_index.json"):
    sd_pipeline.load_stable_diffusion(str(tmp_path))
  bad = _edit(directory, str(tmp_path / "a"), "model_index.json", lambda d: d.pop("vae"))
  with pytest.raises(CheckpointError, match="has no 'vae' component"):
    sd_pipeline.load_stable_diffusion(bad)
  bad = _edit(
      directory,
      str(tmp_path / "b"),
      "model_index.json",
      lambda d: d.update(_class_name="StableDiffusionXLPipeline"),
  )
  with pytest.raises(CheckpointError, match="'StableDiffusionXLPipeline' is not supported"):
    sd_pipeline.load_stable_diffusion(bad)
  bad = str(tmp_path / "c")
  shutil.copytree(directory, bad)
  shutil.rmtree(os.path.join(bad, "text_encoder"))
  with pytest.raises(CheckpointError, match="component directory text_encoder/ is missing"):
    sd_pipeline.load_stable_diffusion(bad)
  bad = _edit(
      directory,
      str(tmp_path / "d"),
      "scheduler/scheduler_config.json",
      lambda d: d.update(timestep_spacing="trailing"),
  )
  with pytest.raises(ValueError, match="timestep_spacing='trailing' is not supported"):
    sd_pipeline.load_stable_diffusion(bad)
  bad = _edit(
      directory,
      str(tmp_path / "e"),
      "scheduler/scheduler_config.json",
      lambda d: d.update(prediction_type="sample"),
  )
  with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
    sd_pipeline.load_stable_diffusion(bad)
  with pytest.raises(ValueError, match="compute_dtype='float16': valid choices"):
    pipeline.SamplingConfig(compute_dtype="float16")


def test_scheduler_configs_of_the_released_pipelines():
  """SD 1.5 ships a PNDM config and SD 2.1 a v-prediction DDIM one; both give the scaled-linear
  schedule with steps_offset 1 and abar_final = abar_0."""
  sd15 = {
      "_class_name": "PNDMScheduler",
      "_diffusers_version": "0.6.0",
      "beta_end": 0.012,
      "beta_schedule": "scaled_linear",
      "beta_start": 0.00085,
      "num_train_timesteps": 1000,
      "set_alpha_to_one": False,
      "skip_prk_steps": True,
      "steps_offset": 1,
      "trained_betas": None,
      "clip_sample": False,
  }
  schedule, prediction, clip = sd_pipeline.schedule_from_diffusers(sd15)
  want = diffusers.DDIMScheduler.from_config(sd15)
  np.testing.assert_allclose(schedule.alphas_cumprod, want.alphas_cumprod.numpy(), rtol=1e-6)
  assert float(schedule.final_alpha_cumprod) == pytest.approx(float(want.final_alpha_cumprod))
  assert (prediction, clip, schedule.steps_offset) == ("epsilon", None, 1)
  sd21 = {**sd15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
  del sd21["skip_prk_steps"]
  assert sd_pipeline.schedule_from_diffusers(sd21)[1] == "v_prediction"
  with pytest.raises(ValueError, match=r"unsupported scheduler field\(s\) \['karras'\]"):
    sd_pipeline.schedule_from_diffusers({**sd15, "karras": True})


def _unet_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([10, 700])
  ctx = rng.normal(size=(2, 12, 32)).astype(np.float32)
  return x, t, ctx


def _torch_unet(unet, x, t, ctx):
  with torch.no_grad():
    out = unet(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx)
    )
  return out.sample.numpy().transpose(0, 2, 3, 1)


def test_unet_lora_exports_load_in_diffusers(pipes, tmp_path):
  from flax import nnx

  from alignjax.models import lora as lora_lib
  from alignjax.models.convert import diffusers_lora, unet_keys

  theirs, ours, directory = pipes
  _epsilon_only(ours)
  unet = ours.unet
  lora = diffusers_lora.init_unet_lora(unet, 4, jax.random.key(1))
  n_attn = sum(1 for n, _ in theirs.unet.named_modules() if n.endswith(("attn1", "attn2")))
  assert len(lora) == 4 * n_attn and all(
      n.endswith(("to_q/kernel", "to_k/kernel", "to_v/kernel", "to_out/0/kernel")) for n in lora
  )
  keys = jax.random.split(jax.random.key(2), len(lora))
  lora = {  # trained-looking factors: B != 0
      n: {"a": p["a"], "b": 0.1 * jax.random.normal(k, p["b"].shape)}
      for k, (n, p) in zip(keys, sorted(lora.items()))
  }
  graphdef, base = nnx.split(unet)
  merged = lora_lib.merged_model(graphdef, base, lora, alpha=8.0)
  x, t, ctx = _unet_inputs()
  want = np.asarray(merged(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
  assert np.max(np.abs(want - np.asarray(unet(x, t, ctx)))) > 1e-3  # the adapter matters

  # LoRA alone, in diffusers' format, loaded by StableDiffusionPipeline.load_lora_weights.
  diffusers_lora.save_unet_lora(str(tmp_path / "lora"), lora, alpha=8.0)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(directory)
  pipe.load_lora_weights(str(tmp_path / "lora"))
  np.testing.assert_allclose(_torch_unet(pipe.unet, x, t, ctx), want, atol=1e-4)
  back, alpha, rslora = diffusers_lora.load_unet_lora(str(tmp_path / "lora"), unet)
  assert (alpha, rslora, sorted(back)) == (8.0, False, sorted(lora))
  for n in lora:
    np.testing.assert_array_equal(np.asarray(back[n]["b"]), np.asarray(lora[n]["b"]))

  # LoRA merged into full weights, loaded by UNet2DConditionModel.from_pretrained.
  unet_keys.save_unet(str(tmp_path / "merged"), merged)
  loaded = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "merged"))
  np.testing.assert_allclose(_torch_unet(loaded, x, t, ctx), want, atol=1e-4)

  # A LoRA file made for another UNet is refused, naming the key and the shapes.
  other = {n: {"a": p["a"][:-1], "b": p["b"]} for n, p in lora.items()}
  diffusers_lora.save_unet_lora(str(tmp_path / "bad"), other, alpha=8.0)
  with pytest.raises(CheckpointError, match=r"lora_A.weight' has shape \(4, \d+\); the module"):
    diffusers_lora.load_unet_lora(str(tmp_path / "bad"), unet)
  with pytest.raises(ValueError, match=r"unknown \['to_x'\]; valid"):
    diffusers_lora.unet_lora_target(["to_q", "to_x"])
