"""transformers' `CLIPModel` (both towers, their projections and the logit scale), in Flax NNX.

The towers are `alignjax.models.sd.clip`'s: `text_model` is a `CLIPTextModel` and
`vision_model` a `CLIPVisionModelWithProjection` (which holds `visual_projection`), so a
reward can take `model.vision_model` wherever a vision tower is expected. With E_T, E_I the
projected embeddings and s = logit_scale (stored, as in transformers, as a log):

    text_embeds(ids)      E_T = W_text pooled(ids)        (get_text_features; clip eq. 6)  (eq. 1)
    image_embeds(pixels)  E_I = W_vis post_layernorm(h_L[:, 0])  (get_image_features)      (eq. 2)
    cos(u, v) = u . v / (||u|| ||v||)                                                      (eq. 3)
    logits_per_image[i, j] = exp(s) cos(E_I[i], E_T[j])                                    (eq. 4)

Pixels are NHWC [B, S, S, 3] already normalised (`clip.normalize_images`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.models.sd.clip import CLIPTextModel, CLIPVisionModelWithProjection, Linear
from alignjax.models.sd.clip_config import HARMLESS_KEYS, CLIPTextConfig, CLIPVisionConfig

MODEL_TYPE = "clip"
# Top-level keys of a CLIPModel config.json besides the two tower configs.
_TOP_KEYS = frozenset({"projection_dim", "logit_scale_init_value", "text_config", "vision_config"})
# transformers 4 dumps also wrote `text_config_dict` / `vision_config_dict` (often null).
_LEGACY_KEYS = frozenset({"text_config_dict", "vision_config_dict"})


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
  """A CLIPModel config: both towers and the shared projection width.

  The towers' own `projection_dim` entries are overridden by the top-level one (transformers'
  CLIPModel builds both projections with `config.projection_dim`).
  """

  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  def __post_init__(self):
    if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int):
      raise ValueError(f"projection_dim={self.projection_dim!r}: must be a positive integer")
    if self.projection_dim < 1:
      raise ValueError(f"projection_dim={self.projection_dim!r}: must be a positive integer")
    object.__setattr__(
        self, "text", dataclasses.replace(self.text, projection_dim=self.projection_dim)
    )
    object.__setattr__(
        self, "vision", dataclasses.replace(self.vision, projection_dim=self.projection_dim)
    )

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> CLIPModelConfig:
    """From the dict of a transformers CLIPModel config.json (model_type "clip"); strict: an
    unknown key (top level or in a tower's config) is a ValueError naming it."""
    if not isinstance(d, Mapping):
      raise ValueError(f"CLIPModelConfig.from_hf: expected a config.json dict, got {type(d)}")
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
      raise ValueError(
          f"CLIPModelConfig.from_hf: model_type={d['model_type']!r}; expected {MODEL_TYPE!r} "
          "(a transformers CLIPModel). Load single towers with clip_keys.load_clip_text / "
          "load_clip_vision."
      )
    unknown = sorted(set(d) - _TOP_KEYS - _LEGACY_KEYS - HARMLESS_KEYS)
    if unknown:
      raise ValueError(
          f"CLIPModelConfig.from_hf: config key(s) {unknown} are not understood by alignjax's "
          f"CLIPModel; understood: {sorted(_TOP_KEYS)}"
      )
    towers = {}
    for kind, tower_cls in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
      sub = d.get(f"{kind}_config") or d.get(f"{kind}_config_dict") or {}
      if not isinstance(sub, Mapping):
        raise ValueError(f"CLIPModelConfig.from_hf: {kind}_config must be a dict, got {sub!r}")
      try:
        towers[kind] = tower_cls.from_hf(sub)
      except ValueError as e:
        raise ValueError(f"{kind}_config: {e}") from e
    kwargs = {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if k in d}
    return cls(towers["text"], towers["vision"], **kwargs)


class CLIPModel(nnx.Module):
  """transformers' CLIPModel: `text_embeds`, `image_embeds` and `logits` (eqs. 1-4).

  Parameter paths: text_model/..., vision_model/... (with vision_model/visual_projection),
  text_projection/kernel [H_text, projection_dim], logit_scale (a scalar, log of the scale).
  """

  def __init__(self, config: CLIPModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.text_model = CLIPTextModel(config.text, rngs=rngs, **kw)
    self.vision_model = CLIPVisionModelWithProjection(config.vision, rngs=rngs, **kw)
    self.text_projection = Linear(
        config.text.hidden_size, config.projection_dim, key=rngs.params(), bias=False, **kw
    )
    self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

  def text_embeds(self, input_ids, attention_mask=None) -> jax.Array:
    """[B, projection_dim] projected pooled text features (eq. 1), not normalised."""
    return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

  def image_embeds(self, pixel_values) -> jax.Array:
    """[B, projection_dim] projected image features (eq. 2) of normalised NHWC pixels."""
    return self.vision_model(pixel_values).image_embeds

  def logits(self, input_ids, pixel_values, attention_mask=None) -> jax.Array:
    """logits_per_image [B_images, B_texts] (eq. 4), in float32."""
    e_i = l2_normalize(self.image_embeds(pixel_values))
    e_t = l2_normalize(self.text_embeds(input_ids, attention_mask))
    return jnp.exp(self.logit_scale[...].astype(jnp.float32)) * (e_i @ e_t.T)


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| over the last axis, in float32 (eq. 3's normalisation)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
