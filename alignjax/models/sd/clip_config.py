"""Configurations of the CLIP text and vision towers, read strictly from transformers' config.json.

`CLIPTextConfig.from_hf(d)` / `CLIPVisionConfig.from_hf(d)` take the dict of a
`CLIPTextModel` / `CLIPVisionModelWithProjection` config.json (model_type "clip_text_model" /
"clip_vision_model"). A key missing from the file takes transformers' default, as transformers
does. Keys that describe the architecture are translated; bookkeeping keys, token ids the
model does not use, initialiser scales and dropout rates are accepted and ignored (alignjax's
CLIP towers are inference-only, so `attention_dropout` and `dropout` have no effect); any
other key is refused with a ValueError naming it, so a checkpoint of a different architecture
is never silently mis-read. A `CLIPModel` config (model_type "clip", both towers) is refused:
load each tower from its own checkpoint. `to_hf()` writes a config.json transformers reads back
to the same model.

Activations (`hidden_act`):

    quick_gelu(x) = x sigmoid(1.702 x)                                              (eq. 1)
    gelu(x)       = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2                          (eq. 2)
    gelu_new(x)   = x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2               (eq. 3)

SD 1.x uses ViT-L/14's text tower (quick_gelu); SD 2.x uses OpenCLIP ViT-H's (gelu).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new")
DTYPES = ("float32", "bfloat16", "float16")
TEXT_MODEL_TYPE = "clip_text_model"
VISION_MODEL_TYPE = "clip_vision_model"

# Accepted and ignored: bookkeeping, training-only rates, initialiser scales, and the
# PretrainedConfig defaults older transformers releases dumped into every config.json.
HARMLESS_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "_attn_implementation_autoset",
        "attention_dropout",  # inference only: no dropout is applied
        "dropout",
        "initializer_range",
        "initializer_factor",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "use_bfloat16",
        "gradient_checkpointing",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tie_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_word_embeddings",
        "tokenizer_class",
        "task_specific_params",
        "prefix",
        "finetuning_task",
        "pruned_heads",
        "tf_legacy_loss",
        # generation defaults of old PretrainedConfig dumps (no decoding here)
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "sep_token_id",
        # token ids: the text tower reads eos_token_id (a field); the vision tower none
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
    }
)


def _refuse_clip_model(d: Mapping[str, Any], what: str) -> None:
  if d.get("model_type") == "clip" or "text_config" in d or "vision_config" in d:
    raise ValueError(
        f"{what}: this is a CLIPModel config (model_type 'clip', both towers); alignjax loads "
        f"a {TEXT_MODEL_TYPE!r} or {VISION_MODEL_TYPE!r} checkpoint (save the tower with "
        "transformers' CLIPTextModel / CLIPVisionModelWithProjection.save_pretrained)"
    )


def _check_int(name: str, value, *, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
  return value


def _common_checks(c) -> None:
  for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    _check_int(name, getattr(c, name))
  if c.hidden_act not in ACTIVATIONS:
    raise ValueError(f"hidden_act={c.hidden_act!r}: must be one of {ACTIVATIONS}")
  if c.hidden_size % c.num_attention_heads:
    raise ValueError(
        f"hidden_size={c.hidden_size} is not divisible by "
        f"num_attention_heads={c.num_attention_heads}"
    )
  if not isinstance(c.layer_norm_eps, (int, float)) or c.layer_norm_eps <= 0:
    raise ValueError(f"layer_norm_eps={c.layer_norm_eps!r}: must be a positive number")
  if c.projection_dim is not None:
    _check_int("projection_dim", c.projection_dim)


def _from_hf(cls, d: Mapping[str, Any], model_type: str, architecture: str):
  what = f"{cls.__name__}.from_hf"
  if not isinstance(d, Mapping):
    raise ValueError(f"{what}: expected a config.json dict, got {type(d).__name__}")
  _refuse_clip_model(d, what)
  if d.get("model_type", model_type) != model_type:
    raise ValueError(
        f"{what}: model_type={d['model_type']!r}; expected {model_type!r} ({architecture})"
    )
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields - HARMLESS_KEYS)
  if unknown:
    raise ValueError(
        f"{what}: config key(s) {unknown} are not understood by alignjax's {architecture}; "
        f"understood: {sorted(fields)}"
    )
  if "eos_token_id" in fields and isinstance(d.get("eos_token_id"), list):
    raise ValueError(
        f"eos_token_id={d['eos_token_id']!r}: must be a single integer (the pooled output "
        "reads the position of one end-of-text token)"
    )
  return cls(**{k: v for k, v in d.items() if k in fields})


def _to_hf(c, model_type: str, architecture: str, dtype: str) -> dict[str, Any]:
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: must be one of {DTYPES}")
  d = dataclasses.asdict(c)
  d.update(
      architectures=[architecture],
      model_type=model_type,
      attention_dropout=0.0,
      initializer_factor=1.0,
      initializer_range=0.02,
      torch_dtype=dtype,
  )
  return d


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' CLIPTextConfig, architecture fields only (defaults: transformers' own).

  projection_dim is unused by the text tower (kept so config.json round-trips); bos and pad
  ids are unused by the model; eos_token_id selects the pooling rule (`clip.pooled_index`).
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int | None = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    _common_checks(self)
    _check_int("vocab_size", self.vocab_size)
    _check_int("max_position_embeddings", self.max_position_embeddings)
    _check_int("eos_token_id", self.eos_token_id, minimum=0)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
    return _from_hf(cls, d, TEXT_MODEL_TYPE, "CLIPTextModel")

  def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
    return _to_hf(self, TEXT_MODEL_TYPE, "CLIPTextModel", dtype)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' CLIPVisionConfig, architecture fields only (defaults: transformers' own).

  image_size and patch_size must be integers (square images and patches, as CLIP's vision
  embeddings assume); the patch grid is image_size // patch_size per side.
  """

  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _common_checks(self)
    for name in ("num_channels", "image_size", "patch_size"):
      _check_int(name, getattr(self, name))
    if self.patch_size > self.image_size:
      raise ValueError(f"patch_size={self.patch_size} exceeds image_size={self.image_size}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid**2 + 1

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
    return _from_hf(cls, d, VISION_MODEL_TYPE, "CLIPVisionModelWithProjection")

  def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
    return _to_hf(self, VISION_MODEL_TYPE, "CLIPVisionModelWithProjection", dtype)
