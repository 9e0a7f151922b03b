"""Full-size Stable Diffusion 1.5 training steps on shape-only weights.

One training step of DDPO, DRaFT and Adjoint Matching, built from an experiment config with
the SD 1.5 UNet (859,520,964 parameters), its VAE and, where the step differentiates a
reward, the LAION aesthetic predictor on CLIP ViT-L/14 — all as `jax.ShapeDtypeStruct`s
(alignjax.models.sd.presets): nothing is allocated. `jax.eval_shape(step.fn, *step.args)`
checks a full-size config without weights; `step.lower(mesh)` compiles it for a mesh, and
the compiled program's memory analysis is the memory plan (benchmarks/sd_memory_plan.py).

The steps are the ones the experiment scripts jit:

    ddpo   epoch(state, frozen, trajectory, advantages)  (alignjax.algorithms.ddpo)
    draft  update(state, frozen, cond, key)              (alignjax.algorithms.draft)
    am     update(state, frozen, key, cond)              (alignjax.algorithms.adjoint_matching_ddpm)

with the text condition {"text": [B, 77, 768]} of the SD 1.5 text encoder (its output; the
encoder itself runs once per prompt batch, outside the step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignjax import parallel, training
from alignjax.algorithms import adjoint_matching_ddpm as am_ddpm
from alignjax.algorithms import ddpo, draft
from alignjax.diffusion import pipeline, samplers, schedules
from alignjax.models.convert import diffusers_lora
from alignjax.models.sd import presets
from alignjax.models.sd.clip import CLIPVisionModelWithProjection
from alignjax.models.sd.clip_config import CLIPVisionConfig
from alignjax.rewards import clip_rewards

# The SD 1.5 scheduler config (scheduler/scheduler_config.json of the pipeline).
SD15_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1)
SD15_LATENT_SHAPE = (64, 64, 4)  # 512 x 512 pixels
# openai/clip-vit-large-patch14's vision config: the aesthetic predictor's embedding.
CLIP_VIT_L14_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
ALGORITHMS = ("ddpo", "draft", "am")


@dataclasses.dataclass(frozen=True)
class AbstractStep:
  """A pure training step and its shape-only arguments (state, frozen, *data); `batch`: the
  global batch size, the leading axis of the data leaves that are batch-major."""

  name: str
  fn: Callable
  state: Any
  frozen: Any
  data: tuple
  batch: int

  @property
  def args(self) -> tuple:
    return (self.state, self.frozen, *self.data)

  def shapes(self):
    """The step's outputs as shapes (jax.eval_shape: no memory)."""
    return jax.eval_shape(self.fn, *self.args)

  def placed_args(self, mesh: Mesh, rules=None) -> tuple:
    """`args` with shardings on `mesh`: state and frozen weights by the parameter `rules`
    (the library's FSDP default when None), batch-major data over the data axes."""
    state_sh = parallel.param_shardings(self.state, mesh, rules)
    frozen_sh = parallel.param_shardings(self.frozen, mesh, rules)
    data_sh = jax.tree_util.tree_map(lambda x: _batch_sharding(x, self.batch, mesh), self.data)
    place = lambda tree, sh: jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh
    )
    return (place(self.state, state_sh), place(self.frozen, frozen_sh), *place(self.data, data_sh))

  def lower(self, mesh: Mesh, rules=None, **jit_kwargs):
    """The step lowered for `mesh` (`placed_args`), the state donated as the scripts do."""
    return jax.jit(self.fn, donate_argnums=0, **jit_kwargs).lower(*self.placed_args(mesh, rules))


def _batch_sharding(x, batch: int, mesh: Mesh) -> NamedSharding:
  """Batch-major leaves (leading axis `batch`) over the data axes; the rest (timesteps, keys)
  replicated."""
  if x.ndim and x.shape[0] == batch and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return parallel.batch_sharding(mesh)
  return NamedSharding(mesh, PartitionSpec())


def f32(*shape) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def text_condition(batch: int) -> dict:
  """The SD 1.5 text condition of `batch` prompts: CLIP ViT-L/14 text embeddings."""
  return {"text": f32(batch, presets.SD15_TEXT_TOKENS, presets.SD15_TEXT_WIDTH)}


def null_condition() -> dict:
  """The guidance null condition (the empty prompt's embedding; its values do not matter)."""
  return {"text": jnp.zeros((presets.SD15_TEXT_TOKENS, presets.SD15_TEXT_WIDTH))}


def abstract_aesthetic_scorer() -> clip_rewards.AestheticScorer:
  """The LAION aesthetic predictor on CLIP ViT-L/14 with shape-only weights."""
  config = CLIPVisionConfig(**CLIP_VIT_L14_VISION)
  tower = nnx.eval_shape(lambda: CLIPVisionModelWithProjection(config, rngs=nnx.Rngs(0)))
  mlp, n_in = {}, config.projection_dim
  for name, n_out in clip_rewards.AESTHETIC_LAYERS:
    mlp[name] = {"kernel": f32(n_in, n_out), "bias": f32(n_out)}
    n_in = n_out
  return clip_rewards.AestheticScorer(tower, mlp)


def _key() -> jax.ShapeDtypeStruct:
  return jax.eval_shape(lambda: jax.random.key(0))


class _Parts:
  """What every step shares: the abstract UNet and VAE, the schedule, the fine-tuning split."""

  def __init__(self, config):
    self.config = config
    self.graphdef, self.params = nnx.split(presets.abstract_unet())
    self.schedule = schedules.make_schedule("scaled_linear", 1000, **SD15_SCHEDULE)
    self.finetune = training.Finetune.from_config(config.finetune)
    self.optimizer = training.make_optimizer(config.optimizer)
    vae_graphdef, self.vae_params = nnx.split(presets.abstract_vae())
    dtype = config.model.compute_dtype
    self.decode = lambda params, x: pipeline.decode_latents(
        nnx.merge(vae_graphdef, params), x, dtype
    )

  def eps_fn(self, params):
    model = nnx.merge(self.graphdef, params)
    m = self.config.model
    eps = pipeline.unet_eps_fn(model, self.schedule, "epsilon", m.compute_dtype, remat=m.remat)
    return lambda x, t, cond: eps(x, t, cond["text"])

  def split(self, params):
    """(trainable, frozen base) of the config's fine-tuning mode (LoRA on the attention)."""
    plan = (diffusers_lora.unet_lora_target(), None)
    return self.finetune.split(params, jax.random.key(0), plan)


def ddpo_step(config, mesh: Mesh | None = None) -> AbstractStep:
  """One DDPO round's inner epoch on `sampling.batch_size x batches_per_round` trajectories;
  with a `mesh`, each microbatch is spread over its data axes, as experiments/ddpo.py does."""
  p, s = _Parts(config), config.sampling

  def init(params):
    trainable, frozen = p.split(params)
    return training.TrainState.create(trainable, p.optimizer, jax.random.key(0)), frozen

  state, frozen = jax.eval_shape(init, p.params)
  batch, steps = s.batch_size * s.batches_per_round, s.num_steps
  traj = samplers.Trajectory(
      latents=f32(batch, steps + 1, *SD15_LATENT_SHAPE),
      timesteps=jax.ShapeDtypeStruct((steps,), jnp.int32),
      prev_timesteps=jax.ShapeDtypeStruct((steps,), jnp.int32),
      log_probs=f32(batch, steps),
      log_prob_sums=f32(batch, steps),
      stds=f32(steps),
      cond=text_condition(batch),
  )
  d = config.ddpo
  epoch = ddpo.make_epoch_fn(
      lambda trainable, frozen: p.eps_fn(p.finetune.params(trainable, frozen)),
      p.schedule,
      p.optimizer,
      objective=d.objective,
      clip_range=d.clip_range,
      eta=s.eta,
      guidance_scale=s.guidance_scale,
      null_cond=null_condition(),
      timestep_fraction=d.timestep_fraction,
      num_minibatches=d.num_minibatches,
      num_microbatches=d.num_microbatches,
      clip_sample=s.clip_sample,
      mesh=mesh,
      data_axes=parallel.DATA_AXES,
      minibatch_loop=d.minibatch_loop,
  )
  return AbstractStep("ddpo", epoch, state, frozen, (traj, f32(batch)), batch)


def draft_step(config, mesh: Mesh | None = None) -> AbstractStep:
  """One DRaFT update (the config's variant) on `sampling.batch_size` prompts, the aesthetic
  reward differentiated through the VAE decoder and CLIP ViT-L/14."""
  del mesh  # its data need no placement inside the step
  p, s, d = _Parts(config), config.sampling, config.draft
  scorer = abstract_aesthetic_scorer()
  kl = d.kl_weight > 0

  def init(params):
    trainable, lora_base = p.split(params)
    kl_base = params if kl and p.finetune.mode == "full" else {}
    state = training.TrainState.create(trainable, p.optimizer, jax.random.key(0))
    return state, {"lora_base": lora_base, "kl_base": kl_base}

  state, frozen = jax.eval_shape(init, p.params)
  frozen = {**frozen, "decoder": p.vae_params, "reward": scorer.params}

  def base_eps_fn_builder(frozen):
    return p.eps_fn(frozen["kl_base" if p.finetune.mode == "full" else "lora_base"])

  update = draft.make_update_fn(
      lambda prepared, frozen: p.eps_fn(prepared),
      p.schedule,
      None,
      p.optimizer,
      num_steps=s.num_steps,
      eta=s.eta,
      guidance_scale=s.guidance_scale,
      null_cond=null_condition(),
      shape=SD15_LATENT_SHAPE,
      remat_policy=d.remat_policy,
      reward_scale=d.reward_scale,
      kl_weight=d.kl_weight,
      base_eps_fn_builder=base_eps_fn_builder if kl else None,
      clip_sample=s.clip_sample,
      decode_builder=lambda frozen: (lambda x: p.decode(frozen["decoder"], x)),
      reward_builder=lambda frozen: (lambda images, cond: scorer.score(frozen["reward"], images)),
      prepare=lambda trainable, frozen: p.finetune.params(trainable, frozen["lora_base"]),
      **draft.variant_options(d.variant, d.truncation_k, d.lv_samples),
  )
  return AbstractStep(
      "draft", update, state, frozen, (text_condition(s.batch_size), _key()), s.batch_size
  )


def am_step(config, mesh: Mesh | None = None) -> AbstractStep:
  """One Adjoint Matching update (DDPM chain of the eps model) on `sampling.batch_size`
  prompts, with the aesthetic reward through the VAE decoder."""
  del mesh  # its data need no placement inside the step
  p, s, a = _Parts(config), config.sampling, config.am
  scorer = abstract_aesthetic_scorer()

  def guided(params):
    return samplers.classifier_free_guidance(p.eps_fn(params), s.guidance_scale, null_condition())

  def init(params):
    trainable, _ = p.split(params)
    return training.TrainState.create(trainable, p.optimizer, jax.random.key(0))

  state = jax.eval_shape(init, p.params)
  frozen = {"base": p.params, "reward": scorer.params, "decoder": p.vae_params}

  def reward_fn_builder(frozen):
    return lambda x, cond: scorer.score(frozen["reward"], p.decode(frozen["decoder"], x))

  update = am_ddpm.make_update_fn(
      lambda trainable, frozen: guided(p.finetune.params(trainable, frozen["base"])),
      lambda frozen: guided(frozen["base"]),
      reward_fn_builder,
      p.schedule,
      p.optimizer,
      lam=a.lam,
      num_steps=s.num_steps,
      shape=SD15_LATENT_SHAPE,
      eta=s.eta,
      clip_sample=s.clip_sample or None,
      num_timesteps=a.num_timesteps,
      loss_clip=a.loss_clip,
      num_microbatches=a.num_microbatches,
  )
  return AbstractStep(
      "am", update, state, frozen, (_key(), text_condition(s.batch_size)), s.batch_size
  )


def step(algorithm: str, config, mesh: Mesh | None = None) -> AbstractStep:
  """The full-size step of `algorithm` (one of ALGORITHMS) for its SD 1.5 config; `mesh`: the
  mesh it will be lowered for, where the step places data itself (DDPO's microbatches)."""
  builders = {"ddpo": ddpo_step, "draft": draft_step, "am": am_step}
  if algorithm not in builders:
    raise ValueError(f"algorithm {algorithm!r}: valid choices are {ALGORITHMS}")
  return builders[algorithm](config, mesh)
