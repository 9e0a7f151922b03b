"""One model interface for the diffusion fine-tuning scripts: the embedded digits model and
Stable Diffusion behind the same `DiffusionBackend`.

A script draws prompts on the host, turns them into the denoiser's condition on the device,
samples latents with the (guided) sampler, decodes them into images and scores the images:

    batch   = backend.prompts.train(seed, B) or .eval(index, B)    host: PromptBatch      (1)
    cond    = backend.condition(batch, sharding)                    device: a pytree, [B, ...]
              digits: the class ids [B];  SD: {"text": c [B, S, D], "prompt_ids": [B, S]}
              with c = text_encoder(prompt_ids) (pipeline eq. 2)                          (2)
    eps     = backend.apply(denoiser, x_t, t, cond)                 the sampler's EpsFn     (3)
    null    = backend.null_cond                                     one example's null condition
              digits: the null class (= num_classes);  SD: {"text": c_null [S, D]}
    images  = backend.decode(backend.decoder_params, x_0)           in [0, 1], differentiable
              digits: clip((x + 1) / 2, 0, 1);  SD: the VAE decoder (pipeline eq. 4)      (4)

(3) and (4) are pure functions of their parameter arguments, so a jitted step takes the
denoiser's and the decoder's weights as arguments (never as compile-time constants) and DRaFT
or Adjoint Matching differentiate through (4). A dict condition may carry leaves the denoiser
does not read (the reward's token ids): `samplers.null_like` keeps those per example.

`PromptBatch.keys` are what DDPO's per-prompt statistics are keyed by (the class id, or the
prompt string), `labels` integer ids of the prompts for within-prompt diversity
(`alignjax.metrics.within_class_diversity`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.diffusion import pipeline
from alignjax.diffusion.schedules import NoiseSchedule

FAMILIES = ("digits", "stable_diffusion")
DEFAULT_SAMPLING = pipeline.SamplingConfig()


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """B prompts on the host (eq. 1): `cond` the raw condition (numpy pytree, every leaf [B,
  ...]), `keys` [B] the per-prompt statistics keys, `labels` [B] int prompt ids, `texts` [B]
  readable prompts."""

  cond: Any
  keys: np.ndarray
  labels: np.ndarray
  texts: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.labels)


class ClassPrompts:
  """Class-conditional prompts 0..num_classes-1: training draws them uniformly from a seed;
  evaluation batch b holds the classes (b·B + i) mod num_classes, i = 0..B-1."""

  def __init__(self, num_classes: int):
    self.num_classes = int(num_classes)

  def _batch(self, ids: np.ndarray) -> PromptBatch:
    ids = ids.astype(np.int32)
    return PromptBatch(ids, ids.copy(), ids.astype(np.int64), tuple(str(int(i)) for i in ids))

  def train(self, seed: int, batch_size: int) -> PromptBatch:
    rng = np.random.default_rng(seed)
    return self._batch(rng.integers(0, self.num_classes, batch_size, dtype=np.int32))

  def eval(self, index: int, batch_size: int) -> PromptBatch:
    return self._batch((np.arange(batch_size) + index * batch_size) % self.num_classes)


class TextPrompts:
  """Text prompts from a list (a shipped prompt set or a file): training draws them uniformly
  with replacement from a seed (diffusion_prompts eq. 2); evaluation batch b holds prompts
  (b·B + i) mod N. `tokenize(texts) -> {name: int ids [B, S]}` gives the raw condition."""

  def __init__(self, prompts: Sequence[str], tokenize: Callable[[list[str]], dict]):
    if isinstance(prompts, str) or not len(prompts):
      raise ValueError("TextPrompts: give a non-empty list of prompt strings")
    self.prompts = tuple(prompts)
    self._tokenize = tokenize

  def _batch(self, idx: np.ndarray) -> PromptBatch:
    texts = [self.prompts[i] for i in idx]
    keys = np.asarray(texts, dtype=object)
    return PromptBatch(self._tokenize(texts), keys, idx.astype(np.int64), tuple(texts))

  def train(self, seed: int, batch_size: int) -> PromptBatch:
    rng = np.random.default_rng(seed)
    return self._batch(rng.integers(0, len(self.prompts), batch_size))

  def eval(self, index: int, batch_size: int) -> PromptBatch:
    return self._batch((np.arange(batch_size) + index * batch_size) % len(self.prompts))


def global_array(x: np.ndarray, sharding=None) -> jax.Array:
  """A global array placed by `sharding` from a numpy value every process holds in full."""
  x = np.asarray(x)
  if sharding is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


@dataclasses.dataclass
class DiffusionBackend:
  """What a diffusion script needs of a model (module docstring, eqs. 1-4).

  denoiser: the network that is fine-tuned (an NNX module; its state the base parameters);
  apply(denoiser, x, t, cond) -> eps (eq. 3); decode(decoder_params, x) -> images (eq. 4);
  encode(encoder_params, raw_cond) -> cond (eq. 2; None: the raw condition is the condition);
  lora_plan: the (target regex, num_in) of `training.Finetune.split` (None: every kernel);
  export(directory, denoiser): writes the fine-tuned model in the family's own format; base:
  what checkpoint metadata records about the frozen models; image_columns: the image grid's
  width in logs.
  """

  family: str
  denoiser: nnx.Module
  schedule: NoiseSchedule
  latent_shape: tuple[int, ...]
  null_cond: Any
  apply: Callable
  decode: Callable
  decoder_params: Any
  prompts: Any
  base: dict
  export: Callable[[str, nnx.Module], Any]
  encode: Callable | None = None
  encoder_params: Any = None
  lora_plan: tuple[str, Any] | None = None
  clip_sample: float | None = None
  image_columns: int = 8
  _encode_jit: Any = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family={self.family!r}: valid choices are {FAMILIES}")

  def eps_fn(self, denoiser: nnx.Module) -> Callable:
    """The unguided EpsFn of `denoiser` (a module of this backend's graph)."""
    return lambda x, t, cond: self.apply(denoiser, x, t, cond)

  def condition(self, batch: PromptBatch, sharding=None) -> Any:
    """Eq. 2: the device condition of a PromptBatch, every leaf placed by `sharding`."""
    raw = jax.tree_util.tree_map(lambda x: global_array(x, sharding), batch.cond)
    if self.encode is None:
      return raw
    if self._encode_jit is None:
      self._encode_jit = jax.jit(self.encode)
    return self._encode_jit(self.encoder_params, raw)


# ----------------------------------------------------------------------------- digits


def digits_images(x: jax.Array) -> jax.Array:
  """Eq. 4 for the digits model: diffusion space [-1, 1] → images in [0, 1]."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def digits_backend(
    unet: nnx.Module, schedule: NoiseSchedule, base: dict, export
) -> DiffusionBackend:
  """The embedded class-conditional digits UNet (alignjax.models.unet): condition = class ids,
  null condition = the extra class `num_classes`, images = clipped diffusion space."""
  cfg = unet.config
  return DiffusionBackend(
      family="digits",
      denoiser=unet,
      schedule=schedule,
      latent_shape=(cfg.image_size, cfg.image_size, cfg.in_channels),
      null_cond=cfg.num_classes,
      apply=lambda model, x, t, cond: model(x, t, cond),
      decode=lambda params, x: digits_images(x),
      decoder_params={},
      prompts=ClassPrompts(cfg.num_classes),
      base=base,
      export=export,
      image_columns=cfg.num_classes,
  )


# ----------------------------------------------------------------------------- Stable Diffusion


def stable_diffusion_backend(
    sd: pipeline.StableDiffusion,
    prompts: Sequence[str],
    *,
    sampling: pipeline.SamplingConfig = DEFAULT_SAMPLING,
    remat: bool = False,
    base: dict | None = None,
    extra_inputs: Callable[[list[str]], dict] | None = None,
) -> DiffusionBackend:
  """A Stable Diffusion pipeline as a backend: the UNet is fine-tuned; the text encoder (eq.
  2) and the VAE decoder (eq. 4) stay frozen and are passed as parameters.

  sampling: the image size, `compute_dtype` (float32 master weights, bfloat16 compute) and
  `clip_skip`; remat: rematerialise each UNet block in the backward pass. extra_inputs(texts)
  -> {name: [B, ...]}: raw condition leaves for the reward (e.g. its own CLIP token ids).
  """
  from alignjax.models.convert import diffusers_lora, unet_keys

  dtype = sampling.compute_dtype
  text_graph, text_params = nnx.split(sd.text_encoder)
  vae_graph, vae_params = nnx.split(sd.vae)
  empty = pipeline.tokenize(sd, [""])

  def tokenize(texts: list[str]) -> dict:
    raw = {"prompt_ids": pipeline.tokenize(sd, texts).astype(np.int32)}
    if extra_inputs is not None:
      raw.update(extra_inputs(texts))
    return raw

  def text(params, ids):
    encoder = nnx.merge(text_graph, pipeline.cast_floating(params, jnp.dtype(dtype)))
    return pipeline.encode_text(encoder, ids, sampling.clip_skip).astype(jnp.float32)

  def encode(params, raw):
    return {**raw, "text": text(params, raw["prompt_ids"])}

  def apply(model, x, t, cond):
    eps = pipeline.unet_eps_fn(model, sd.schedule, sd.prediction_type, dtype, remat=remat)
    return eps(x, t, cond["text"])

  def decode(params, x):
    return pipeline.decode_latents(nnx.merge(vae_graph, params), x, dtype)

  def export(directory: str, unet: nnx.Module):
    return unet_keys.save_unet(directory, unet, overwrite=True)

  null_text = np.asarray(jax.jit(text)(text_params, jnp.asarray(empty)))[0]
  return DiffusionBackend(
      family="stable_diffusion",
      denoiser=sd.unet,
      schedule=sd.schedule,
      latent_shape=pipeline.latent_shape(sd, sampling),
      null_cond={"text": null_text},
      apply=apply,
      decode=decode,
      decoder_params=vae_params,
      prompts=TextPrompts(prompts, tokenize),
      base=dict(base or {}),
      export=export,
      encode=encode,
      encoder_params=text_params,
      lora_plan=(diffusers_lora.unet_lora_target(), None),
      clip_sample=sd.clip_sample,
      image_columns=4,
  )


def load_stable_diffusion_backend(
    directory: str | os.PathLike,
    prompts: Sequence[str],
    *,
    sampling: pipeline.SamplingConfig = DEFAULT_SAMPLING,
    remat: bool = False,
    variant: str | None = None,
    mesh=None,
    rules=None,
    extra_inputs=None,
) -> DiffusionBackend:
  """`stable_diffusion_backend` of a diffusers pipeline directory, loaded straight into sharded
  state (`convert.sd_pipeline.load_stable_diffusion`); `base` records the directory and a
  content hash of each component."""
  from alignjax import run_identity
  from alignjax.models.convert import sd_pipeline

  directory = os.fspath(directory)
  sd = sd_pipeline.load_stable_diffusion(directory, variant=variant, mesh=mesh, rules=rules)
  base = {"init": "pretrained", "family": "stable_diffusion", "path": os.path.abspath(directory)}
  for part in ("unet", "vae", "text_encoder"):
    base[part] = run_identity.frozen_model_metadata(os.path.join(directory, part))
  return stable_diffusion_backend(
      sd, prompts, sampling=sampling, remat=remat, base=base, extra_inputs=extra_inputs
  )
