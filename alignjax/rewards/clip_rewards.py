r"""CLIP-based rewards for Stable Diffusion: LAION aesthetic score, CLIP score, CLIP preference.

Every reward here is differentiable in the images. Images x [B, H, W, 3] in [0, 1], any size,
go through CLIP's preprocessing and the vision tower of `alignjax.models.sd.clip`:

    (1)  x' = (crop_S(resize_S(x)) - mu) / sigma    (`clip.normalize_images`, S = image_size,
                                                       mu, sigma = CLIP_MEAN, CLIP_STD)
    (2)  E_I = image_embeds(x'),  E_T = text_embeds(ids)    (clip_dual eqs. 1-2)
    (3)  cos(u, v) = u . v / (||u|| ||v||),   e = E_I / ||E_I||

LAION aesthetic predictor ("improved-aesthetic-predictor", sac+logos+ava1-l14-linearMSE, as
DDPO uses it on CLIP ViT-L/14 image embeddings, d = 768): five affine layers with no
activation between them (its Dropouts are inactive at inference),

    (4)  a(x) = W_7 (W_6 (W_4 (W_2 (W_0 e + b_0) + b_2) + b_4) + b_6) + b_7,
         W_0: 1024 x d, W_2: 128 x 1024, W_4: 64 x 128, W_6: 16 x 64, W_7: 1 x 16.

CLIP score (torchmetrics' `CLIPScore`, Hessel et al. 2021 with w = 100), chosen as default,
and the preference score of CLIP models fine-tuned on human choices (PickScore; HPS-style):

    (5)  clip_score(x, c) = w max(cos(E_I, E_T), 0)      (clip_at_zero=False: w cos(E_I, E_T))
    (6)  preference(x, c) = exp(s) cos(E_I, E_T)        (s = the checkpoint's logit_scale)

The max in eq. 5 has zero gradient where the cosine is negative (rare for real images and
CLIP models, common for random ones): pass clip_at_zero=False to train on the raw cosine.

Design: weights are arguments, never constants. Each scorer (`AestheticScorer`,
`CLIPScorer`) splits its NNX model once into a static graph and a parameter pytree,
`scorer.params`, and exposes a pure function `scorer.score(params, images[, ids])`.
`scorer.reward(params)` wraps it in a `Reward` whose fn calls a `jax.jit` of `score` with the
params as an argument: calling it outside a jitted step compiles once per input shape (not per
parameter value, and without embedding hundreds of MB of weights in the program); inside a
jitted training step, pass `scorer.params` as a step argument (`reward_params`) and build the
reward there (`scorer.reward(reward_params)(images, prompts)`), so the weights are traced
inputs and changing their values never recompiles. Text prompts are tokenised on the host
(`CLIPScorer.tokenize`); under `jax.jit` pass int token ids [B, T] as the prompts instead.
The Rewards' fns are jitted already: do not wrap them with `Reward.jitted()`, which would
capture the params as constants of the outer program (and cannot take string prompts).

The aesthetic MLP is read from `.safetensors` or `.npz` with the published state-dict names
(`layers.{0,2,4,6,7}.{weight,bias}`, weights [out, in]); alignjax never imports torch, so
convert the published `.pth` once:

    python -c "import torch, safetensors.torch as st; st.save_file({k: v.float().contiguous() for k, v in torch.load('sac+logos+ava1-l14-linearMSE.pth', map_location='cpu').items()}, 'aesthetic_mlp.safetensors')"
"""  # noqa: E501

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.models.convert.clip_keys import load_clip_tokenizer, tokenize_prompts
from alignjax.models.convert.clip_model import load_clip_model
from alignjax.models.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from alignjax.models.sd.clip import CLIPVisionModelWithProjection, normalize_images
from alignjax.models.sd.clip_dual import CLIPModel, l2_normalize
from alignjax.rewards.base import Reward

__all__ = [
    "AESTHETIC_LAYERS",
    "AestheticScorer",
    "CLIPScorer",
    "aesthetic_mlp",
    "aesthetic_reward",
    "clip_preference_reward",
    "clip_score_reward",
    "load_aesthetic_mlp",
]

# (state-dict index, output width) of the aesthetic MLP's Linear layers (eq. 4).
AESTHETIC_LAYERS = (("0", 1024), ("2", 128), ("4", 64), ("6", 16), ("7", 1))
WEIGHT_EXTENSIONS = (".safetensors", ".npz")
KINDS = ("clip_score", "preference")
_CONVERT = (
    'python -c "import torch, safetensors.torch as st; st.save_file({k: v.float().contiguous() '
    "for k, v in torch.load('IN.pth', map_location='cpu').items()}, 'OUT.safetensors')\""
)


# --------------------------------------------------------------------------- aesthetic MLP


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  ext = os.path.splitext(path)[1].lower()
  if ext in (".pth", ".pt", ".bin", ".ckpt"):
    raise CheckpointError(
        f"{path}: PyTorch pickles are not read (alignjax never imports torch); convert once "
        f"with: {_CONVERT}"
    )
  if ext == ".safetensors":
    ckpt = SafetensorsCheckpoint(os.path.dirname(path) or ".", weights_name=os.path.basename(path))
    return {k: np.asarray(ckpt.get(k), np.float32) for k in ckpt.tensors}
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: np.asarray(f[k], np.float32) for k in f.files}
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: not a readable .npz file ({e})") from e
  raise CheckpointError(f"{path}: unknown extension {ext!r}; expected one of {WEIGHT_EXTENSIONS}")


def _weights_file(path: str) -> str:
  if os.path.isdir(path):
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(WEIGHT_EXTENSIONS))
    if len(found) != 1:
      raise CheckpointError(
          f"{path}: expected exactly one aesthetic MLP weights file ({WEIGHT_EXTENSIONS}) in the "
          f"directory; found {found}"
      )
    return os.path.join(path, found[0])
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such aesthetic MLP weights file or directory")
  return path


def load_aesthetic_mlp(path: str | os.PathLike) -> dict[str, dict[str, jax.Array]]:
  """The aesthetic MLP's parameters {"0": {"kernel" [in, out], "bias" [out]}, ..., "7": ...}
  from a `.safetensors` / `.npz` file (or a directory holding exactly one) in the published
  naming. Strict: a missing, unexpected or mis-shaped tensor is a `CheckpointError` naming the
  file and the tensor. The input width d (768 for ViT-L/14) is read from layers.0.weight."""
  path = _weights_file(os.fspath(path))
  tensors = _read_tensors(path)
  expected = [f"layers.{i}.{p}" for i, _ in AESTHETIC_LAYERS for p in ("weight", "bias")]
  missing = [k for k in expected if k not in tensors]
  if missing:
    raise CheckpointError(
        f"{path}: aesthetic MLP tensor(s) {missing} missing; found {sorted(tensors)}"
    )
  unused = sorted(set(tensors) - set(expected))
  if unused:
    raise CheckpointError(
        f"{path}: tensor(s) {unused} are not part of the aesthetic MLP (expected {expected})"
    )
  w0 = tensors["layers.0.weight"]
  n_in = w0.shape[1] if w0.ndim == 2 else -1
  params = {}
  for i, n_out in AESTHETIC_LAYERS:
    for p, want in (("weight", (n_out, n_in)), ("bias", (n_out,))):
      got = tensors[f"layers.{i}.{p}"].shape
      if got != want or (p == "weight" and n_in < 1):
        raise CheckpointError(f"{path}: tensor 'layers.{i}.{p}' has shape {got}, expected {want}")
    params[i] = {"kernel": tensors[f"layers.{i}.weight"].T, "bias": tensors[f"layers.{i}.bias"]}
    n_in = n_out
  return jax.tree.map(jnp.asarray, params)


def aesthetic_mlp(
    mlp_params: Mapping[str, Mapping[str, jax.Array]], embeds: jax.Array
) -> jax.Array:
  """Eq. 4 on L2-normalised embeddings e [B, d] -> [B] (float32; no activations, no dropout)."""
  h = jnp.asarray(embeds, jnp.float32)
  for i, _ in AESTHETIC_LAYERS:
    layer = mlp_params[i]
    h = h @ jnp.asarray(layer["kernel"], jnp.float32) + jnp.asarray(layer["bias"], jnp.float32)
  return h[:, 0]


def _vision_tower(model) -> CLIPVisionModelWithProjection:
  tower = model.vision_model if isinstance(model, CLIPModel) else model
  if not isinstance(tower, CLIPVisionModelWithProjection):
    raise TypeError(
        "expected a CLIPVisionModelWithProjection (clip_keys.load_clip_vision) or a CLIPModel "
        f"(clip_model.load_clip_model); got {type(model).__name__}"
    )
  return tower


class AestheticScorer:
  """LAION aesthetic score (eqs. 1-4) with the weights as a pytree argument.

  params = {"vision": the vision tower's nnx.State, "mlp": the MLP's parameters}.
  """

  def __init__(self, vision_model, mlp_params, *, name: str = "aesthetic"):
    """vision_model: a CLIPVisionModelWithProjection or a CLIPModel (its vision tower is used);
    mlp_params: `load_aesthetic_mlp`'s dict, or a path for it."""
    tower = _vision_tower(vision_model)
    if isinstance(mlp_params, (str, os.PathLike)):
      mlp_params = load_aesthetic_mlp(mlp_params)
    n_in = np.shape(mlp_params["0"]["kernel"])[0]
    if n_in != tower.config.projection_dim:
      raise ValueError(
          f"aesthetic MLP: layers.0 takes {n_in}-dim embeddings but the CLIP vision tower "
          f"projects to {tower.config.projection_dim} (ViT-L/14's is 768)"
      )
    self.name = name
    self.image_size = tower.config.image_size
    self.graphdef, vision_state = nnx.split(tower)
    self.params = {"vision": vision_state, "mlp": mlp_params}
    self._jit_score = jax.jit(self.score)

  def embeddings(self, params, images) -> jax.Array:
    """e [B, d] of eqs. 1-3 (L2-normalised image embeddings)."""
    tower = nnx.merge(self.graphdef, params["vision"])
    return l2_normalize(tower(normalize_images(images, self.image_size)).image_embeds)

  def score(self, params, images) -> jax.Array:
    """Pure: aesthetic score [B] (eq. 4) of images [B, H, W, 3] in [0, 1]."""
    return aesthetic_mlp(params["mlp"], self.embeddings(params, images))

  def reward(self, params=None) -> Reward:
    """A differentiable `Reward` scoring with `params` (default `self.params`); prompts unused."""
    params = self.params if params is None else params
    return Reward(self.name, lambda images, prompts: self._jit_score(params, images), True)


def aesthetic_reward(vision_model, mlp_params, *, name: str = "aesthetic") -> Reward:
  """`AestheticScorer(vision_model, mlp_params).reward()`: DDPO's aesthetic reward (eq. 4)."""
  return AestheticScorer(vision_model, mlp_params, name=name).reward()


# --------------------------------------------------------------------------- CLIP text-image


class CLIPScorer:
  """CLIP score (eq. 5) or CLIP preference (eq. 6) of a `CLIPModel`, weights as an argument.

  params: the CLIPModel's nnx.State. Prompts: a sequence of B strings (tokenised on the host
  with `tokenizer`, padded to max_length) or int token ids [B, T] (needed under jax.jit).
  """

  def __init__(
      self,
      model: CLIPModel,
      tokenizer=None,
      *,
      kind: str = "clip_score",
      scale: float = 100.0,
      clip_at_zero: bool = True,
      max_length: int | None = None,
      name: str | None = None,
  ):
    if not isinstance(model, CLIPModel):
      raise TypeError(f"CLIPScorer: expected a clip_dual.CLIPModel, got {type(model).__name__}")
    if kind not in KINDS:
      raise ValueError(f"CLIPScorer: kind={kind!r} must be one of {KINDS}")
    self.kind, self.scale, self.clip_at_zero = kind, float(scale), bool(clip_at_zero)
    self.name = name or kind
    self.tokenizer = tokenizer
    self.config = model.config
    n_pos = model.config.text.max_position_embeddings
    if max_length is None:
      max_length = min(n_pos, getattr(tokenizer, "model_max_length", n_pos) or n_pos)
    if max_length > n_pos:
      raise ValueError(f"CLIPScorer: max_length={max_length} exceeds the text tower's {n_pos}")
    self.max_length = max_length
    self.graphdef, self.params = nnx.split(model)
    self._jit_score = jax.jit(self.score)

  def tokenize(self, prompts) -> np.ndarray:
    """Host: B strings -> int32 [B, max_length] (bos, tokens, eos, padding)."""
    if self.tokenizer is None:
      raise ValueError(
          f"reward {self.name!r}: prompts are strings but no tokenizer was given; pass one "
          "(clip_keys.load_clip_tokenizer) or int token ids [B, T]"
      )
    return tokenize_prompts(self.tokenizer, list(prompts), self.max_length)

  def input_ids(self, prompts) -> Any:
    """Token ids of prompts: strings are tokenised; int arrays (or tracers) pass through."""
    if prompts is None:
      raise ValueError(f"reward {self.name!r} scores images against prompts; got prompts=None")
    if isinstance(prompts, str):
      raise ValueError(f"reward {self.name!r}: prompts must be one per image, got a single str")
    if isinstance(prompts, (jax.Array, np.ndarray)) and jnp.issubdtype(prompts.dtype, jnp.integer):
      if prompts.ndim != 2:
        raise ValueError(f"reward {self.name!r}: token ids must be [B, T], got {prompts.shape}")
      return prompts
    return self.tokenize(prompts)

  def _cosine(self, model: CLIPModel, images, input_ids) -> jax.Array:
    pixels = normalize_images(images, self.config.vision.image_size)
    e_i = l2_normalize(model.image_embeds(pixels))
    e_t = l2_normalize(model.text_embeds(jnp.asarray(input_ids)))
    return jnp.sum(e_i * e_t, axis=-1)

  def cosine(self, params, images, input_ids) -> jax.Array:
    """Pure: cos(E_I, E_T) [B] (eq. 3) of image b and prompt b."""
    return self._cosine(nnx.merge(self.graphdef, params), images, input_ids)

  def score(self, params, images, input_ids) -> jax.Array:
    """Pure: eq. 5 (kind "clip_score") or eq. 6 (kind "preference"), float32 [B]."""
    model = nnx.merge(self.graphdef, params)
    cos = self._cosine(model, images, input_ids)
    if self.kind == "preference":
      return jnp.exp(model.logit_scale[...].astype(jnp.float32)) * cos
    score = self.scale * cos
    return jnp.maximum(score, 0.0) if self.clip_at_zero else score

  def reward(self, params=None) -> Reward:
    """A differentiable `Reward` scoring with `params` (default `self.params`)."""
    params = self.params if params is None else params

    def fn(images, prompts):
      return self._jit_score(params, images, self.input_ids(prompts))

    return Reward(self.name, fn, True)


def clip_score_reward(
    model: CLIPModel,
    tokenizer=None,
    *,
    scale: float = 100.0,
    clip_at_zero: bool = True,
    max_length: int | None = None,
) -> Reward:
  """CLIP score (eq. 5; defaults: torchmetrics' CLIPScore, 100 max(cos, 0)) of a CLIPModel."""
  return CLIPScorer(
      model, tokenizer, scale=scale, clip_at_zero=clip_at_zero, max_length=max_length
  ).reward()


def clip_preference_reward(
    model: CLIPModel | str | os.PathLike,
    tokenizer=None,
    *,
    max_length: int | None = None,
    name: str = "clip_preference",
    dtype: str = "float32",
) -> Reward:
  """PickScore / HPS-style preference reward exp(s) cos(E_I, E_T) (eq. 6).

  model: a `CLIPModel` or a transformers CLIPModel checkpoint directory (loaded with
  `clip_model.load_clip_model`); with a directory and no tokenizer, the directory's tokenizer
  files are used (`clip_keys.load_clip_tokenizer`)."""
  if isinstance(model, (str, os.PathLike)):
    directory = os.fspath(model)
    model, _ = load_clip_model(directory, dtype=dtype)
    if tokenizer is None:
      tokenizer = load_clip_tokenizer(directory)
  return CLIPScorer(model, tokenizer, kind="preference", max_length=max_length, name=name).reward()
