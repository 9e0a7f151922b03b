"""Load a local diffusers Stable Diffusion pipeline directory into alignjax components.

A pipeline directory (what diffusers' `StableDiffusionPipeline.save_pretrained` writes):

    model_index.json        {"_class_name": "StableDiffusionPipeline",
                             "unet": ["diffusers", "UNet2DConditionModel"], ...}
    unet/                   config.json, diffusion_pytorch_model[.<variant>].safetensors
                            (or sharded with diffusion_pytorch_model.safetensors.index[.<variant>].json)
    vae/                    the same for AutoencoderKL
    text_encoder/           config.json, model[.<variant>].safetensors (transformers' CLIPTextModel)
    tokenizer/              CLIPTokenizer files (vocab.json, merges.txt, ...)
    scheduler/              scheduler_config.json

Each model goes straight into its (sharded) state: its shapes come from `nnx.eval_shape`, its
shardings from them, and each tensor is read from the memory-mapped file onto the devices
that hold it (`torch_keys.load_state`). Safety checker and feature extractor are not loaded.

Whatever scheduler the directory names, alignjax samples with DDIM on the same noise schedule
(as DDPO and DRaFT do); only the schedule's fields are read, and fields that change the
schedule or the model's prediction in ways alignjax does not implement are refused by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

from alignjax.diffusion import schedules
from alignjax.diffusion.pipeline import PREDICTION_TYPES, StableDiffusion
from alignjax.models.convert import clip_keys, unet_keys, vae_keys
from alignjax.models.convert.safetensors_io import CheckpointError

MODEL_INDEX = "model_index.json"
PIPELINES = ("StableDiffusionPipeline",)
COMPONENTS = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": (
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "LMSDiscreteScheduler",
        "DPMSolverMultistepScheduler",
    ),
}
NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")
SCHEDULER_FILE = "scheduler_config.json"

# Scheduler fields: those read, those that must keep their default, and sampler-specific ones
# that do not change the noise schedule (alignjax samples DDIM whatever the directory names).
_SCHEDULE_FIELDS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "set_alpha_to_one": None,  # default: the scheduler class's (DDIM True, PNDM False)
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "clip_sample": None,  # default: the class's (DDIM and DDPM True)
    "clip_sample_range": 1.0,
}
_MUST_BE = {
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading",
}
_SAMPLER_ONLY = {
    "_class_name",
    "_diffusers_version",
    "skip_prk_steps",
    "variance_type",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "timestep_type",
    "final_sigmas_type",
    "algorithm_type",
    "solver_order",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_lu_lambdas",
    "lambda_min_clipped",
}
_CLIP_DEFAULT_TRUE = ("DDIMScheduler", "DDPMScheduler")
_ALPHA_ONE_DEFAULT_TRUE = ("DDIMScheduler",)


def _read_json(path: str, what: str) -> dict:
  if not os.path.exists(path):
    raise CheckpointError(f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)} ({what})")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e
  if not isinstance(d, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return d


def read_model_index(directory: str) -> dict[str, str]:
  """component -> class name for the components alignjax loads; refuses what it cannot load."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: not a directory")
  index = _read_json(os.path.join(directory, MODEL_INDEX), "not a diffusers pipeline directory")
  path = os.path.join(directory, MODEL_INDEX)
  name = index.get("_class_name")
  if name not in PIPELINES:
    raise CheckpointError(f"{path}: pipeline {name!r} is not supported; supported: {PIPELINES}")
  found = {}
  for component, classes in COMPONENTS.items():
    entry = index.get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
      raise CheckpointError(f"{path}: the pipeline has no {component!r} component")
    if entry[1] not in classes:
      raise CheckpointError(f"{path}: {component} is a {entry[1]}; supported: {', '.join(classes)}")
    if not os.path.isdir(os.path.join(directory, component)):
      raise CheckpointError(f"{directory}: component directory {component}/ is missing")
    found[component] = entry[1]
  unknown = sorted(
      k for k in index if not k.startswith("_") and k not in COMPONENTS and k not in NOT_LOADED
  )
  if unknown:
    raise CheckpointError(f"{path}: components {unknown} are not part of a supported pipeline")
  return found


def schedule_from_diffusers(config: dict[str, Any], where: str = "scheduler") -> tuple:
  """(NoiseSchedule, prediction_type, clip_sample or None) from a scheduler config dict."""
  cls = config.get("_class_name", "DDIMScheduler")
  unknown = sorted(set(config) - set(_SCHEDULE_FIELDS) - set(_MUST_BE) - _SAMPLER_ONLY)
  if unknown:
    raise ValueError(f"{where}: unsupported scheduler field(s) {unknown}")
  for key, value in _MUST_BE.items():
    if key in config and config[key] != value:
      raise ValueError(f"{where}: {key}={config[key]!r} is not supported (only {value!r})")
  get = lambda k: config.get(k, _SCHEDULE_FIELDS[k])
  prediction = get("prediction_type")
  if prediction not in PREDICTION_TYPES:
    raise ValueError(
        f"{where}: prediction_type={prediction!r} is not supported; valid: {PREDICTION_TYPES}"
    )
  alpha_one = config.get("set_alpha_to_one", cls in _ALPHA_ONE_DEFAULT_TRUE)
  clip = config.get("clip_sample", cls in _CLIP_DEFAULT_TRUE)
  schedule = schedules.make_schedule(
      get("beta_schedule"),
      get("num_train_timesteps"),
      get("beta_start"),
      get("beta_end"),
      set_alpha_to_one=bool(alpha_one),
      steps_offset=get("steps_offset"),
  )
  return schedule, prediction, float(get("clip_sample_range")) if clip else None


def load_stable_diffusion(
    directory: str,
    *,
    variant: str | None = None,
    dtype: str = "float32",
    mesh=None,
    rules=None,
) -> StableDiffusion:
  """The UNet, VAE, CLIP text encoder, tokenizer and noise schedule of a diffusers Stable
  Diffusion directory, parameters in `dtype` placed on `mesh` by `rules` (the default device
  when `mesh` is None). variant: the weights' variant ("fp16", "bf16"; None: the plain files)."""
  read_model_index(directory)
  sub = lambda c: os.path.join(directory, c)
  unet, _ = unet_keys.load_unet(sub("unet"), variant=variant, dtype=dtype, mesh=mesh, rules=rules)
  vae, _ = vae_keys.load_vae(sub("vae"), variant=variant, dtype=dtype, mesh=mesh, rules=rules)
  text_encoder, _ = clip_keys.load_clip_text(
      sub("text_encoder"), variant=variant, dtype=dtype, mesh=mesh, rules=rules
  )
  tokenizer = clip_keys.load_clip_tokenizer(sub("tokenizer"))
  scheduler_path = os.path.join(sub("scheduler"), SCHEDULER_FILE)
  schedule, prediction, clip_sample = schedule_from_diffusers(
      _read_json(scheduler_path, "the scheduler's config"), scheduler_path
  )
  return StableDiffusion(
      unet=unet,
      vae=vae,
      text_encoder=text_encoder,
      tokenizer=tokenizer,
      schedule=schedule,
      prediction_type=prediction,
      clip_sample=clip_sample,
  )
