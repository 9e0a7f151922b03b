"""The diffusion scripts' model interface (alignjax.diffusion.backend) and configured rewards
(alignjax.rewards.configured), for the digits model and a tiny random SD pipeline."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignjax import testing
from alignjax.diffusion import backend as backend_lib
from alignjax.diffusion import pipeline, samplers, schedules
from alignjax.models.convert import sd_pipeline
from alignjax.rewards import classifier_log_prob, clip_rewards, configured
from alignjax.models.convert.clip_keys import load_clip_tokenizer
from alignjax.models.convert.clip_model import load_clip_model

PROMPTS = ["lower newer", "lowest", "wider lower", "newer"]


def test_class_prompts_draw_the_scripts_ids():
  prompts = backend_lib.ClassPrompts(10)
  batch = prompts.train(123, 16)
  want = np.random.default_rng(123).integers(0, 10, 16, dtype=np.int32)
  np.testing.assert_array_equal(batch.cond, want)
  assert batch.cond.dtype == np.int32 and len(batch) == 16
  np.testing.assert_array_equal(batch.keys, want)
  np.testing.assert_array_equal(prompts.eval(1, 8).cond, [8, 9, 0, 1, 2, 3, 4, 5])
  assert batch.texts[0] == str(want[0])


def test_text_prompts_cycle_in_eval_and_draw_uniformly_in_training():
  tokenize = lambda texts: {"ids": np.array([[len(t)] for t in texts], np.int32)}
  prompts = backend_lib.TextPrompts(PROMPTS, tokenize)
  ev = prompts.eval(1, 3)
  assert ev.texts == ("newer", "lower newer", "lowest")
  np.testing.assert_array_equal(ev.labels, [3, 0, 1])
  np.testing.assert_array_equal(ev.cond["ids"][:, 0], [5, 11, 6])
  assert list(ev.keys) == list(ev.texts)
  idx = np.random.default_rng(7).integers(0, 4, 64)
  assert prompts.train(7, 64).texts == tuple(PROMPTS[i] for i in idx)
  with pytest.raises(ValueError, match="non-empty list"):
    backend_lib.TextPrompts([], tokenize)


def test_digits_backend_is_the_unet_with_clipped_images():
  unet = testing.tiny_unet(seed=0)
  backend = backend_lib.digits_backend(unet, schedules.make_schedule("linear"), {}, None)
  x = jax.random.normal(jax.random.key(0), (4,) + backend.latent_shape)
  t, c = jnp.array([1, 50, 500, 999]), jnp.array([0, 3, 9, 10])
  np.testing.assert_array_equal(backend.eps_fn(unet)(x, t, c), unet(x, t, c))
  np.testing.assert_array_equal(backend.decode({}, x), jnp.clip((x + 1) / 2, 0, 1))
  assert backend.null_cond == unet.config.num_classes and backend.lora_plan is None
  batch = backend.prompts.eval(0, 4)
  np.testing.assert_array_equal(backend.condition(batch), batch.cond)


@pytest.fixture(scope="module")
def sd_backend(tiny_sd_dir):
  sd = sd_pipeline.load_stable_diffusion(tiny_sd_dir)
  extra = lambda texts: {"reward_ids": np.full((len(texts), 3), 7, np.int32)}
  return sd, backend_lib.stable_diffusion_backend(sd, PROMPTS, extra_inputs=extra)


@pytest.mark.slow
def test_stable_diffusion_backend_matches_the_pipeline(sd_backend):
  sd, backend = sd_backend
  batch = backend.prompts.eval(0, 3)
  cond = backend.condition(batch)
  ids = pipeline.tokenize(sd, list(batch.texts))
  np.testing.assert_array_equal(cond["prompt_ids"], ids)
  np.testing.assert_array_equal(cond["reward_ids"], 7)
  np.testing.assert_allclose(cond["text"], pipeline.encode_text(sd.text_encoder, ids), atol=1e-6)
  empty = pipeline.encode_text(sd.text_encoder, pipeline.tokenize(sd, [""]))[0]
  np.testing.assert_allclose(backend.null_cond["text"], empty, atol=1e-6)
  assert backend.latent_shape == (8, 8, 4)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
  t = jnp.array([1, 400, 981])
  want = pipeline.unet_eps_fn(sd.unet, sd.schedule)(x, t, cond["text"])
  np.testing.assert_allclose(backend.eps_fn(sd.unet)(x, t, cond), want, atol=1e-6)
  np.testing.assert_allclose(
      backend.decode(backend.decoder_params, x), pipeline.decode_latents(sd.vae, x), atol=1e-6
  )
  # guidance nulls the text only; the token ids travel with each example
  guided = samplers.classifier_free_guidance(backend.eps_fn(sd.unet), 5.0, backend.null_cond)
  null = {**cond, "text": jnp.broadcast_to(backend.null_cond["text"], cond["text"].shape)}
  e_c, e_u = want, backend.eps_fn(sd.unet)(x, t, null)
  np.testing.assert_allclose(guided(x, t, cond), e_u + 5.0 * (e_c - e_u), atol=1e-5)
  with pytest.raises(ValueError, match=r"null condition entries \['nope'\]"):
    samplers.null_like({"nope": 0}, cond)
  assert backend.lora_plan[0].endswith("/kernel$")


def test_configured_rewards_equal_the_library_rewards(tiny_clip_dir):
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  cfg = lambda **kw: ml_collections.ConfigDict(
      {**dict(target=-1, jpeg_quality=95, jpeg_upscale=1, model_dir="", mlp_path=""), **kw}
  )
  clf = testing.tiny_classifier(seed=1)
  digits = configured.make_reward(cfg(name="classifier", target=3), "digits", classifier=clf)
  want = classifier_log_prob(clf, target=3)(images[:, :8, :8, :1], None)
  got = jax.jit(digits.fn)(digits.params, images[:, :8, :8, :1], jnp.array([0, 1]))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert digits.name == "classifier_log_prob_3"
  model, _ = load_clip_model(tiny_clip_dir)
  scorer = clip_rewards.CLIPScorer(model, load_clip_tokenizer(tiny_clip_dir))
  score = configured.make_reward(
      cfg(name="clip_score", model_dir=tiny_clip_dir), "stable_diffusion"
  )
  texts = ["lower", "wider newer"]
  cond = {k: jnp.asarray(v) for k, v in score.extra_inputs(texts).items()}
  np.testing.assert_allclose(
      jax.jit(score.fn)(score.params, images, cond),
      scorer.score(scorer.params, images, scorer.tokenize(texts)),
      atol=1e-5,
  )
  mlp = os.path.join(tiny_clip_dir, "aesthetic_mlp.safetensors")
  aes = configured.make_reward(
      cfg(name="aesthetic", model_dir=tiny_clip_dir, mlp_path=mlp), "stable_diffusion"
  )
  want = clip_rewards.AestheticScorer(model, mlp)
  np.testing.assert_allclose(
      aes.fn(aes.params, images, None), want.score(want.params, images), atol=1e-6
  )
  jpeg = configured.make_reward(cfg(name="jpeg_compressibility"), "stable_diffusion")
  assert not jpeg.differentiable and jpeg.bind()(np.asarray(images)).shape == (2,)


def test_configured_reward_errors_name_the_key():
  cfg = lambda **kw: ml_collections.ConfigDict({**dict(model_dir="", mlp_path="", target=-1), **kw})
  with pytest.raises(configured.RewardConfigError, match="not a reward of the digits model"):
    configured.make_reward(cfg(name="aesthetic"), "digits")
  with pytest.raises(configured.RewardConfigError, match="config.reward.model_dir is empty"):
    configured.make_reward(cfg(name="clip_score"), "stable_diffusion")
  with pytest.raises(configured.RewardConfigError, match="'/missing': no such file"):
    configured.make_reward(cfg(name="aesthetic", model_dir="/missing"), "stable_diffusion")
  with pytest.raises(configured.RewardConfigError, match="model family 'gan'"):
    configured.make_reward(cfg(name="brightness"), "gan")
