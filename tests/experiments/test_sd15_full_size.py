"""The full-size Stable Diffusion 1.5 configs: one training step of each, traced with
`jax.eval_shape` on the full-size UNet (859,520,964 parameters) and, where the step decodes,
the full-size VAE — shapes only, no memory, no weights. The same configs run one real step at
a tiny size in test_ddpo_sd.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import training
from alignjax.algorithms import ddpo
from alignjax.diffusion import pipeline, samplers, schedules
from alignjax.models.convert import diffusers_lora
from alignjax.models.sd import presets
from experiments.configs.ddpo import sd15 as ddpo_sd15

SD15_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1)


def sd15_parts(config):
  unet = presets.abstract_unet()
  graphdef, params = nnx.split(unet)
  schedule = schedules.make_schedule("scaled_linear", 1000, **SD15_SCHEDULE)
  finetune = training.Finetune.from_config(config.finetune)
  plan = (diffusers_lora.unet_lora_target(), None)

  def eps_fn_builder(trainable, frozen):
    model = nnx.merge(graphdef, finetune.params(trainable, frozen))
    eps = pipeline.unet_eps_fn(
        model, schedule, "epsilon", config.model.compute_dtype, remat=config.model.remat
    )
    return lambda x, t, cond: eps(x, t, cond["text"])

  def init(params):
    key = jax.random.key(0)
    trainable, frozen = finetune.split(params, key, plan)
    optimizer = training.make_optimizer(config.optimizer)
    return training.TrainState.create(trainable, optimizer, key), frozen

  return params, schedule, eps_fn_builder, init


@pytest.mark.parametrize("arg", ["reward=aesthetic", "reward=compressibility,finetune=full"])
def test_ddpo_sd15_step_traces_at_full_size(arg):
  config = ddpo_sd15.get_config(arg)
  params, schedule, eps_fn_builder, init = sd15_parts(config)
  assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) == 859_520_964
  state, frozen = jax.eval_shape(init, params)
  s = config.sampling
  batch, steps = s.batch_size * s.batches_per_round, s.num_steps
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  cond = {
      "text": f32(batch, presets.SD15_TEXT_TOKENS, presets.SD15_TEXT_WIDTH),
      "prompt_ids": jax.ShapeDtypeStruct((batch, presets.SD15_TEXT_TOKENS), jnp.int32),
  }
  traj = samplers.Trajectory(
      latents=f32(batch, steps + 1, 64, 64, 4),
      timesteps=jax.ShapeDtypeStruct((steps,), jnp.int32),
      prev_timesteps=jax.ShapeDtypeStruct((steps,), jnp.int32),
      log_probs=f32(batch, steps),
      log_prob_sums=f32(batch, steps),
      stds=f32(steps),
      cond=cond,
  )
  epoch = ddpo.make_epoch_fn(
      eps_fn_builder,
      schedule,
      training.make_optimizer(config.optimizer),
      objective=config.ddpo.objective,
      clip_range=config.ddpo.clip_range,
      eta=s.eta,
      guidance_scale=s.guidance_scale,
      null_cond={"text": jnp.zeros((presets.SD15_TEXT_TOKENS, presets.SD15_TEXT_WIDTH))},
      timestep_fraction=config.ddpo.timestep_fraction,
      num_minibatches=config.ddpo.num_minibatches,
      num_microbatches=config.ddpo.num_microbatches,
      clip_sample=s.clip_sample,
      minibatch_loop=config.ddpo.minibatch_loop,
  )
  new_state, metrics = jax.eval_shape(epoch, state, frozen, traj, f32(batch))[:2]
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  chex_shapes = lambda t: [x.shape for x in jax.tree_util.tree_leaves(t)]
  assert chex_shapes(new_state.params) == chex_shapes(state.params)
  assert metrics["loss"].shape == (config.ddpo.num_minibatches,)
  if config.finetune.mode == "lora":
    assert all(("attn1" in k or "attn2" in k) for k in state.params)
