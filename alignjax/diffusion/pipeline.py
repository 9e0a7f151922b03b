"""Text-to-image sampling with Stable Diffusion components: prompts -> images in [0, 1].

    ids      = tokenizer(prompt), padded to the text encoder's max length                  (1)
    c        = text_encoder(ids) (the last layer, or the penultimate one after the final
               layer norm with clip_skip = 1, as diffusers' `encode_prompt`); c_null likewise
               for the empty prompt                                                          (2)
    x_T      ~ N(0, I) of shape [B, H/f, W/f, 4]   (f = 2^(len(vae.block_out_channels) - 1))
    eps      = eps_θ(x_t, t, c_null) + w (eps_θ(x_t, t, c) − eps_θ(x_t, t, c_null))         (3)
    x_s      = DDIM step (samplers eqs. 1-4), t -> s, for the schedule's `num_steps` steps
    image    = clip(vae.decode(x_0 / scaling_factor) / 2 + ½, 0, 1)                           (4)

A v-prediction UNet (SD 2.x at 768 px) predicts v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0; its
noise prediction is

    eps      = sqrt(ᾱ_t) v + sqrt(1 − ᾱ_t) x_t                                               (5)

Precision: parameters stay float32 (the master weights the optimiser updates);
`compute_dtype="bfloat16"` casts them and the activations to bfloat16 inside the computation
and returns float32 latents and images. The DDIM update itself runs in float32.

The sampler is `alignjax.diffusion.samplers.sample` (one `lax.scan`, with per-step log-probs for
DDPO), so a fine-tuning script gets the same trajectory object as on the embedded model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.diffusion import samplers
from alignjax.diffusion.schedules import NoiseSchedule, alpha_cumprod_at, expand_like
from alignjax.models.convert import clip_keys
from alignjax.models.sd import clip

PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """num_steps DDIM steps with guidance scale w (eq. 3; 1 = no guidance) and DDIM's eta."""

  num_steps: int = 50
  guidance_scale: float = 7.5
  eta: float = 0.0
  height: int | None = None  # pixels; None: the UNet's sample_size times the VAE factor
  width: int | None = None
  compute_dtype: str = "float32"
  clip_skip: int | None = None

  def __post_init__(self):
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={self.compute_dtype!r}: valid choices are {COMPUTE_DTYPES}")
    if not isinstance(self.num_steps, int) or self.num_steps < 1:
      raise ValueError(f"num_steps={self.num_steps!r}: must be an integer >= 1")
    if self.clip_skip is not None and (not isinstance(self.clip_skip, int) or self.clip_skip < 0):
      raise ValueError(f"clip_skip={self.clip_skip!r}: must be None or an integer >= 0")


@dataclasses.dataclass
class StableDiffusion:
  """The components of a Stable Diffusion pipeline (alignjax.models.convert.sd_pipeline loads
  them from a diffusers directory). Models are NNX modules; `tokenizer` a transformers
  CLIPTokenizer (or anything with its __call__); `clip_sample` the scheduler's clip range
  (None: no clipping)."""

  unet: nnx.Module
  vae: nnx.Module
  text_encoder: nnx.Module
  tokenizer: Any
  schedule: NoiseSchedule
  prediction_type: str = "epsilon"
  clip_sample: float | None = None

  def __post_init__(self):
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(
          f"prediction_type={self.prediction_type!r}: valid choices are {PREDICTION_TYPES}"
      )

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def latent_channels(self) -> int:
    return self.vae.config.latent_channels

  @property
  def max_length(self) -> int:
    """The tokenizer's model_max_length (diffusers' choice), capped by the text encoder's."""
    positions = self.text_encoder.config.max_position_embeddings
    length = getattr(self.tokenizer, "model_max_length", None)
    return min(length, positions) if isinstance(length, int) and length > 1 else positions


def cast_floating(tree, dtype):
  """Floating leaves of `tree` to `dtype` (integers and keys untouched)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree
  )


def tokenize(sd: StableDiffusion, prompts: Sequence[str]) -> np.ndarray:
  """Eq. 1: [B, max_length] int32 ids, padded and truncated as diffusers' pipeline does."""
  if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
    raise TypeError(f"prompts must be a sequence of strings, got {prompts!r:.80}")
  return clip_keys.tokenize_prompts(sd.tokenizer, list(prompts), sd.max_length)


def encode_text(text_encoder: nnx.Module, input_ids: jax.Array, clip_skip: int | None = None):
  """Eq. 2: the text embeddings [B, T, D] the UNet attends to (`clip.text_embeddings`)."""
  return clip.text_embeddings(text_encoder, input_ids, clip_skip=clip_skip)


def unet_eps_fn(
    unet: nnx.Module,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    compute_dtype: str = "float32",
    *,
    remat: bool | None = None,
) -> samplers.EpsFn:
  """eps_fn(x [B, h, w, c], t [B], text embeddings [B, T, D]) of the UNet, converting a
  v-prediction by eq. 5, computing in `compute_dtype` and returning float32; `remat`
  rematerialises each UNet block in the backward pass (None: the model's own setting)."""
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type={prediction_type!r}: valid choices are {PREDICTION_TYPES}")
  dtype = jnp.dtype(compute_dtype)
  graphdef, params = nnx.split(unet)
  if dtype != jnp.float32:
    params = cast_floating(params, dtype)
  model = nnx.merge(graphdef, params)

  def eps_fn(x, t, cond):
    out = model(x.astype(dtype), t, cond.astype(dtype), remat=remat).astype(jnp.float32)
    if prediction_type == "epsilon":
      return out
    abar = expand_like(alpha_cumprod_at(schedule, t), x)
    return jnp.sqrt(abar) * out + jnp.sqrt(1.0 - abar) * x  # eq. 5

  return eps_fn


def decode_latents(vae: nnx.Module, latents: jax.Array, compute_dtype: str = "float32"):
  """Eq. 4: images [B, H, W, 3] in [0, 1], float32."""
  dtype = jnp.dtype(compute_dtype)
  if dtype != jnp.float32:
    graphdef, params = nnx.split(vae)
    vae = nnx.merge(graphdef, cast_floating(params, dtype))
  x = vae.decode((latents / vae.config.scaling_factor).astype(dtype)).astype(jnp.float32)
  return jnp.clip(x / 2.0 + 0.5, 0.0, 1.0)


def latent_shape(sd: StableDiffusion, config: SamplingConfig) -> tuple[int, int, int]:
  """(h, w, c) of one latent for the configured image size."""
  f = sd.vae_scale_factor
  default = sd.unet.config.sample_size * f
  height, width = config.height or default, config.width or default
  if height % f or width % f:
    raise ValueError(f"height={height}, width={width}: both must be multiples of {f}")
  return height // f, width // f, sd.latent_channels


def generate(
    sd: StableDiffusion,
    input_ids: jax.Array,
    key: jax.Array,
    config: SamplingConfig = SamplingConfig(),
    *,
    initial_latents: jax.Array | None = None,
    latent_sharding=None,
) -> tuple[jax.Array, samplers.Trajectory]:
  """Images [B, H, W, 3] in [0, 1] and the DDIM trajectory of latents for token ids [B, T]
  (`tokenize`). Call under `jax.jit` (static `config`) or through `make_generate`."""
  input_ids = jnp.asarray(input_ids, jnp.int32)
  empty = jnp.asarray(tokenize(sd, [""]))
  dtype = jnp.dtype(config.compute_dtype)
  text_encoder = sd.text_encoder
  if dtype != jnp.float32:
    graphdef, params = nnx.split(text_encoder)
    text_encoder = nnx.merge(graphdef, cast_floating(params, dtype))
  cond = encode_text(text_encoder, input_ids, config.clip_skip).astype(jnp.float32)
  null = encode_text(text_encoder, empty, config.clip_skip).astype(jnp.float32)[0]
  eps_fn = unet_eps_fn(sd.unet, sd.schedule, sd.prediction_type, config.compute_dtype)
  guided = samplers.classifier_free_guidance(eps_fn, config.guidance_scale, null_cond=null)
  traj = samplers.sample(
      guided,
      sd.schedule,
      cond,
      key,
      shape=latent_shape(sd, config),
      num_steps=config.num_steps,
      eta=config.eta,
      clip_sample=sd.clip_sample,
      initial_latents=initial_latents,
      latent_sharding=latent_sharding,
  )
  images = decode_latents(sd.vae, traj.latents[:, -1], config.compute_dtype)
  return images, traj


def make_generate(sd: StableDiffusion, config: SamplingConfig = SamplingConfig()) -> Callable:
  """A jitted (input_ids, key, initial_latents=None) -> (images, trajectory); the models are
  passed as state so that new parameters do not recompile."""
  graphdef, state = nnx.split((sd.unet, sd.vae, sd.text_encoder))

  @jax.jit
  def run(state, input_ids, key, initial_latents):
    unet, vae, text_encoder = nnx.merge(graphdef, state)
    parts = dataclasses.replace(sd, unet=unet, vae=vae, text_encoder=text_encoder)
    return generate(parts, input_ids, key, config, initial_latents=initial_latents)

  def call(input_ids, key, initial_latents=None, *, models=None):
    current = state if models is None else nnx.state(models)
    return run(current, input_ids, key, initial_latents)

  return call
