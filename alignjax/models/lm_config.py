"""`LMConfig`: one family-agnostic description of a decoder-only LM, and its HF config.json.

`lm_config_from_hf(d)` translates a Hugging Face config.json mapping into an `LMConfig`.
Each supported `model_type` has a translator that reads only the keys it understands; every
other key must be in `HARMLESS_KEYS` (bookkeeping, token ids, training-only dropout rates),
otherwise the config is refused with an error naming the key. Understood keys with values
alignjax does not implement (e.g. `rope_type="yarn"`) are refused the same way. `lm_config_to_hf`
writes the family's own config.json back and checks that it translates to the same config.

Rotary embedding frequencies (head size D, base theta, i = 0 .. D/2-1):

    f_i = theta^(-2i / D)                                                     (eq. 1)
    linear scaling:  f_i <- f_i / s                                           (eq. 2)
    llama3 scaling (factor s, low/high-frequency factors a < b, original context C):
      wavelength w_i = 2 pi / f_i;  r_i = (C / w_i - a) / (b - a)
      f_i <- f_i                          if w_i < C / b
             f_i / s                      if w_i > C / a
             (1 - r_i) f_i / s + r_i f_i  otherwise                           (eq. 3)

HF config quirks handled here (transformers 5 is the reference):
  - v5 writes `rope_parameters` {rope_type, rope_theta, ...}; older files write top-level
    `rope_theta` and `rope_scaling` {type|rope_type, ...}. Both are read; `rope_scaling`
    wins when both are present, as in transformers. Export writes the older pair, which
    transformers 4.45+ and 5 both read.
  - Gemma reads `hidden_act` (the legacy value "gelu" means the tanh approximation); Gemma 2
    reads `hidden_activation`. The other key, when present, must agree.
  - Qwen2/Qwen3 ignore `sliding_window` unless `use_sliding_window` is true; without
    `layer_types`, layers i >= `max_window_layers` use the window. Gemma 2 without
    `layer_types` alternates local (even i) and global (odd i) layers.
  - GPT-2 names sizes n_embd/n_layer/n_head/n_positions/n_inner (None -> 4 n_embd);
    `scale_attn_weights=False` means an attention scale of 1.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping

import numpy as np

FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")

# Keys that never change the function the network computes.
HARMLESS_KEYS = frozenset(
    {
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tokenizer_class",
        "task_specific_params",
        "cache_implementation",
        "_attn_implementation_autoset",
        # Dropout rates describe training only; alignjax LMs are deterministic (eval mode).
        "attention_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "summary_first_dropout",
        # GPT-2 double-heads summary head (not part of a causal LM).
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
    }
)

_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


class ConfigTranslationError(ValueError):
  """A config.json that alignjax cannot represent faithfully."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Architecture of a decoder-only transformer (all families); hashable, JSON round trip."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  activation: str = "silu"
  gated_mlp: bool = True  # SwiGLU/GeGLU: down(act(gate x) * up x); else down(act(up x))
  norm: str = "rms"  # "rms" or "layer"
  norm_eps: float = 1e-6
  norm_offset: float = 0.0  # Gemma: scale = 1 + w
  post_norms: bool = False  # Gemma 2: norms after attention and MLP too
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
  tie_embeddings: bool = False
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  position_embedding: str = "rope"  # "rope" or "learned" (GPT-2)
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 0
  max_position_embeddings: int = 2048
  query_pre_attn_scalar: float | None = None  # attention scale = this^-1/2 (else head_dim)
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  local_layers: tuple[int, ...] = ()  # layers with sliding-window (local) attention
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = "float32"  # parameter and activation dtype; softmax/logits are float32

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f"LMConfig.{field}={getattr(self, field)!r}: {msg}")

    if self.family not in FAMILIES:
      bad("family", f"must be one of {FAMILIES}")
    for f in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "mlp_dim",
        "max_position_embeddings",
    ):
      if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
        bad(f, "must be a positive int")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
    if self.activation not in ACTIVATIONS:
      bad("activation", f"must be one of {ACTIVATIONS}")
    if self.norm not in ("rms", "layer"):
      bad("norm", "must be 'rms' or 'layer'")
    if self.position_embedding not in ("rope", "learned"):
      bad("position_embedding", "must be 'rope' or 'learned'")
    if self.position_embedding == "rope" and self.head_dim % 2:
      bad("head_dim", "must be even for rotary embeddings")
    if self.rope_type not in ROPE_TYPES:
      bad("rope_type", f"must be one of {ROPE_TYPES}")
    if self.dtype not in DTYPES:
      bad("dtype", f"must be one of {DTYPES}")
    for f in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
      if getattr(self, f) is not None and getattr(self, f) <= 0:
        bad(f, "must be None or > 0")
    if any(not 0 <= i < self.num_layers for i in self.local_layers):
      bad("local_layers", f"indices must lie in [0, {self.num_layers})")
    if self.local_layers and (self.sliding_window is None or self.sliding_window <= 0):
      bad("sliding_window", "local_layers need a positive sliding_window")

  @property
  def attention_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  def inv_freq(self) -> np.ndarray:
    """Rotary frequencies f_i [head_dim/2] float32 (eqs. 1-3)."""
    d = self.head_dim
    f = 1.0 / self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # eq. 1
    if self.rope_type == "linear":
      f = f / self.rope_factor  # eq. 2
    elif self.rope_type == "llama3":  # eq. 3
      s, a, b = self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
      c = self.rope_original_max_positions
      wavelength = 2 * math.pi / f
      r = (c / wavelength - a) / (b - a)
      smoothed = (1 - r) * f / s + r * f
      f = np.where(wavelength < c / b, f, np.where(wavelength > c / a, f / s, smoothed))
    return f.astype(np.float32)

  def to_dict(self) -> dict[str, Any]:
    return {
        f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
        for f in dataclasses.fields(self)
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LMConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"LMConfig.from_dict: unknown field(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(
        **{
            k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v
            for k, v in d.items()
        }
    )


# ---------------------------------------------------------------------------------------------
# config.json -> LMConfig


class _Keys:
  """Reads a config.json mapping, remembering which keys were understood."""

  def __init__(self, d: Mapping[str, Any], family: str, understood: frozenset[str]):
    self.d, self.family, self.understood = dict(d), family, understood

  def get(self, key, default=None):
    assert key in self.understood, key  # translators only read keys they declare
    return self.d.get(key, default)

  def require(self, key):
    if self.d.get(key) is None:
      raise ConfigTranslationError(f"{self.family} config.json: required key '{key}' is missing")
    return self.get(key)

  def refuse(self, key, value, why):
    raise ConfigTranslationError(f"{self.family} config.json: unsupported {key}={value!r} ({why})")

  def check_unknown(self):
    unknown = sorted(set(self.d) - self.understood - HARMLESS_KEYS - {"model_type"})
    if unknown:
      raise ConfigTranslationError(
          f"{self.family} config.json: unsupported key(s) {unknown}; alignjax understands "
          f"{sorted(self.understood)} plus the harmless keys {sorted(HARMLESS_KEYS)}"
      )


def _activation(k: _Keys, key: str, value, legacy_gelu_is_tanh: bool = False) -> str:
  if legacy_gelu_is_tanh and value == "gelu":
    return "gelu_tanh"
  if value not in _HF_ACTIVATIONS:
    k.refuse(key, value, f"supported activations: {sorted(_HF_ACTIVATIONS)}")
  return _HF_ACTIVATIONS[value]


def _token_ids(d: Mapping[str, Any]) -> dict[str, Any]:
  eos = d.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
  return dict(
      bos_token_id=d.get("bos_token_id"), eos_token_ids=eos, pad_token_id=d.get("pad_token_id")
  )


_ROPE_KEYS = frozenset({"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor"})
_ROPE_FIELDS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "llama3": {
        "rope_type",
        "type",
        "rope_theta",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    },
}


def _rope(k: _Keys, max_positions: int) -> dict[str, Any]:
  """Rotary settings from v5 `rope_parameters` or legacy `rope_theta` + `rope_scaling`."""
  prf = k.get("partial_rotary_factor")
  if prf not in (None, 1, 1.0):
    k.refuse("partial_rotary_factor", prf, "only full rotary embeddings are supported")
  key = "rope_scaling" if k.get("rope_scaling") else "rope_parameters"
  p = dict(k.get(key) or {})
  if p.pop("partial_rotary_factor", 1.0) != 1.0:
    k.refuse(f"{key}.partial_rotary_factor", k.get(key), "only full rotary embeddings")
  rope_type = p.get("rope_type", p.get("type", "default"))
  if rope_type not in _ROPE_FIELDS:
    k.refuse(f"{key}.rope_type", rope_type, f"supported: {sorted(_ROPE_FIELDS)}")
  extra = sorted(set(p) - _ROPE_FIELDS[rope_type])
  if extra:
    k.refuse(f"{key}", p, f"keys {extra} are not used by rope_type '{rope_type}'")
  out = dict(rope_type=rope_type, rope_theta=float(p.get("rope_theta", k.get("rope_theta", 1e4))))
  if rope_type in ("linear", "llama3"):
    out["rope_factor"] = float(p["factor"])
  if rope_type == "llama3":
    out.update(
        rope_low_freq_factor=float(p["low_freq_factor"]),
        rope_high_freq_factor=float(p["high_freq_factor"]),
        rope_original_max_positions=int(p.get("original_max_position_embeddings", max_positions)),
    )
  return out


_COMMON = (
    frozenset(
        {
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
        }
    )
    | _ROPE_KEYS
)


def _common(k: _Keys) -> dict[str, Any]:
  heads = k.require("num_attention_heads")
  hidden = k.require("hidden_size")
  max_pos = k.require("max_position_embeddings")
  return dict(
      family=k.family,
      vocab_size=k.require("vocab_size"),
      hidden_size=hidden,
      num_layers=k.require("num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=k.get("num_key_value_heads") or heads,
      head_dim=k.get("head_dim") or hidden // heads,
      mlp_dim=k.require("intermediate_size"),
      norm_eps=float(k.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=max_pos,
      **_rope(k, max_pos),
      **_token_ids(k.d),
  )


def _local_layers(k: _Keys, n: int, default_types: list[str]) -> dict[str, Any]:
  types = k.get("layer_types") or default_types
  if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
    k.refuse("layer_types", types, f"need {n} entries from 'full_attention' / 'sliding_attention'")
  local = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
  return dict(local_layers=local, sliding_window=k.get("sliding_window") if local else None)


def _bool_must_be(k: _Keys, key: str, allowed: bool):
  value = k.get(key)
  if value is not None and bool(value) != allowed:
    k.refuse(key, value, f"alignjax supports only {allowed}")


def _llama(k: _Keys) -> dict[str, Any]:
  c = _common(k)
  bias = bool(k.get("attention_bias", False))
  tp = k.get("pretraining_tp")  # only splits matmuls in the original; same function
  if tp is not None and (not isinstance(tp, int) or tp < 1):
    k.refuse("pretraining_tp", tp, "must be a positive int")
  return dict(
      c,
      activation=_activation(k, "hidden_act", k.get("hidden_act", "silu")),
      qkv_bias=bias,
      o_bias=bias,
      mlp_bias=bool(k.get("mlp_bias", False)),
      tie_embeddings=bool(k.get("tie_word_embeddings", False)),
  )


def _qwen(k: _Keys, qk_norm: bool) -> dict[str, Any]:
  c = _common(k)
  n = c["num_layers"]
  use_sw = bool(k.get("use_sliding_window", False))
  window_from = k.get("max_window_layers", 28)
  default = [
      "sliding_attention"
      if use_sw and k.get("sliding_window") is not None and i >= window_from
      else "full_attention"
      for i in range(n)
  ]
  local = _local_layers(k, n, default)
  if local["local_layers"] and not use_sw:
    k.refuse("layer_types", k.get("layer_types"), "sliding layers need use_sliding_window=true")
  out = dict(
      c,
      activation=_activation(k, "hidden_act", k.get("hidden_act", "silu")),
      tie_embeddings=bool(k.get("tie_word_embeddings", False)),
      **local,
  )
  if qk_norm:  # Qwen3: optional bias on q, k, v, o
    bias = bool(k.get("attention_bias", False))
    return dict(out, qkv_bias=bias, o_bias=bias, qk_norm=True)
  return dict(out, qkv_bias=True)  # Qwen2: q, k, v always have a bias, o never


def _gemma(k: _Keys, v2: bool) -> dict[str, Any]:
  c = _common(k)
  bias = bool(k.get("attention_bias", False))
  _bool_must_be(k, "use_bidirectional_attention", False)
  if v2:  # Gemma 2 reads hidden_activation; Gemma reads hidden_act
    main, other, default = "hidden_activation", "hidden_act", "gelu_pytorch_tanh"
  else:
    main, other, default = "hidden_act", "hidden_activation", "gelu_pytorch_tanh"
  act = _activation(k, main, k.get(main) or default, legacy_gelu_is_tanh=not v2)
  if k.get(other) is not None and _activation(k, other, k.get(other), True) != act:
    k.refuse(other, k.get(other), f"disagrees with {main}={k.get(main)!r}, which is used")
  out = dict(
      c,
      activation=act,
      qkv_bias=bias,
      o_bias=bias,
      norm_offset=1.0,
      embed_scale=True,
      tie_embeddings=bool(k.get("tie_word_embeddings", True)),
  )
  if not v2:
    return out
  n = c["num_layers"]
  default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
  return dict(
      out,
      post_norms=True,
      query_pre_attn_scalar=k.get("query_pre_attn_scalar", 256),
      attn_logit_softcap=k.get("attn_logit_softcapping"),
      final_logit_softcap=k.get("final_logit_softcapping"),
      **_local_layers(k, n, default),
  )


def _gpt2(k: _Keys) -> dict[str, Any]:
  for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
    _bool_must_be(k, key, ok)
  hidden, heads = k.require("n_embd"), k.require("n_head")
  n_pos = k.require("n_positions")
  n_ctx = k.get("n_ctx")  # legacy duplicate of n_positions
  if n_ctx is not None and n_ctx != n_pos:
    k.refuse("n_ctx", n_ctx, f"must equal n_positions={n_pos}")
  scale = k.get("scale_attn_weights", True)
  # reorder_and_upcast_attn only changes the precision of mixed-precision attention; alignjax
  # always computes attention scores and softmax in float32.
  k.get("reorder_and_upcast_attn")
  return dict(
      family="gpt2",
      vocab_size=k.require("vocab_size"),
      hidden_size=hidden,
      num_layers=k.require("n_layer"),
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=hidden // heads,
      mlp_dim=k.get("n_inner") or 4 * hidden,
      activation=_activation(k, "activation_function", k.get("activation_function", "gelu_new")),
      gated_mlp=False,
      norm="layer",
      norm_eps=float(k.get("layer_norm_epsilon", 1e-5)),
      qkv_bias=True,
      o_bias=True,
      mlp_bias=True,
      tie_embeddings=bool(k.get("tie_word_embeddings", True)),
      position_embedding="learned",
      max_position_embeddings=n_pos,
      query_pre_attn_scalar=None if scale else 1.0,
      **_token_ids(k.d),
  )


_TRANSLATORS = {
    "llama": (_llama, _COMMON | {"hidden_act", "attention_bias", "mlp_bias", "pretraining_tp"}),
    "qwen2": (
        lambda k: _qwen(k, False),
        _COMMON
        | {
            "hidden_act",
            "use_sliding_window",
            "sliding_window",
            "max_window_layers",
            "layer_types",
        },
    ),
    "qwen3": (
        lambda k: _qwen(k, True),
        _COMMON
        | {
            "hidden_act",
            "use_sliding_window",
            "sliding_window",
            "max_window_layers",
            "layer_types",
            "attention_bias",
        },
    ),
    "gemma": (
        lambda k: _gemma(k, False),
        _COMMON
        | {"hidden_act", "hidden_activation", "attention_bias", "use_bidirectional_attention"},
    ),
    "gemma2": (
        lambda k: _gemma(k, True),
        _COMMON
        | {
            "hidden_act",
            "hidden_activation",
            "attention_bias",
            "use_bidirectional_attention",
            "query_pre_attn_scalar",
            "sliding_window",
            "layer_types",
            "attn_logit_softcapping",
            "final_logit_softcapping",
        },
    ),
    "gpt2": (
        _gpt2,
        frozenset(
            {
                "vocab_size",
                "n_positions",
                "n_ctx",
                "n_embd",
                "n_layer",
                "n_head",
                "n_inner",
                "activation_function",
                "layer_norm_epsilon",
                "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx",
                "reorder_and_upcast_attn",
                "add_cross_attention",
                "tie_word_embeddings",
            }
        ),
    ),
}

UNDERSTOOD_KEYS = {family: understood for family, (_, understood) in _TRANSLATORS.items()}


def lm_config_from_hf(d: Mapping[str, Any], *, dtype: str = "float32") -> LMConfig:
  """HF config.json mapping -> `LMConfig`; unknown keys and unsupported values are refused."""
  family = d.get("model_type")
  if family not in _TRANSLATORS:
    raise ConfigTranslationError(
        f"config.json: model_type={family!r} is not supported; supported: {sorted(_TRANSLATORS)}"
    )
  translate, understood = _TRANSLATORS[family]
  k = _Keys(d, family, understood)
  k.check_unknown()
  try:
    return LMConfig(**translate(k), dtype=dtype)
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigTranslationError):
      raise
    raise ConfigTranslationError(f"{family} config.json: {e}") from e


# ---------------------------------------------------------------------------------------------
# LMConfig -> config.json

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_HF_ACT_NAMES = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _rope_to_hf(c: LMConfig) -> dict[str, Any]:
  out: dict[str, Any] = {"rope_theta": c.rope_theta}
  if c.rope_type == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_factor}
  elif c.rope_type == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": c.rope_factor,
        "low_freq_factor": c.rope_low_freq_factor,
        "high_freq_factor": c.rope_high_freq_factor,
        "original_max_position_embeddings": c.rope_original_max_positions,
    }
  return out


def lm_config_to_hf(c: LMConfig) -> dict[str, Any]:
  """`LMConfig` -> the family's config.json mapping (checked to translate back exactly)."""
  act = _HF_ACT_NAMES[c.activation]
  d: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[c.family]],
      "model_type": c.family,
      "dtype": c.dtype,
      "vocab_size": c.vocab_size,
      "tie_word_embeddings": c.tie_embeddings,
      "bos_token_id": c.bos_token_id,
      "pad_token_id": c.pad_token_id,
      "eos_token_id": (
          c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids) or None
      ),
  }
  types = [
      "sliding_attention" if i in c.local_layers else "full_attention" for i in range(c.num_layers)
  ]
  if c.family == "gpt2":
    d.update(
        n_embd=c.hidden_size,
        n_layer=c.num_layers,
        n_head=c.num_heads,
        n_positions=c.max_position_embeddings,
        n_inner=c.mlp_dim,
        activation_function="gelu_new" if c.activation == "gelu_tanh" else act,
        layer_norm_epsilon=c.norm_eps,
        scale_attn_weights=c.query_pre_attn_scalar is None,
    )
  else:
    d.update(
        hidden_size=c.hidden_size,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps,
        **_rope_to_hf(c),
    )
    if c.family == "llama":
      d.update(hidden_act=act, attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    elif c.family in ("qwen2", "qwen3"):
      d.update(
          hidden_act=act,
          use_sliding_window=bool(c.local_layers),
          layer_types=types,
          sliding_window=c.sliding_window,
      )
      if c.local_layers:  # older readers derive the local layers from max_window_layers
        d["max_window_layers"] = min(c.local_layers)
      if c.family == "qwen3":
        d["attention_bias"] = c.qkv_bias
    elif c.family == "gemma":
      d.update(hidden_act=act, attention_bias=c.qkv_bias)
    else:
      d.update(
          hidden_activation=act,
          attention_bias=c.qkv_bias,
          layer_types=types,
          sliding_window=c.sliding_window,
          query_pre_attn_scalar=c.query_pre_attn_scalar,
          attn_logit_softcapping=c.attn_logit_softcap,
          final_logit_softcapping=c.final_logit_softcap,
      )
  back = lm_config_from_hf(d, dtype=c.dtype)
  if back != c:
    diff = [f.name for f in dataclasses.fields(c) if getattr(back, f.name) != getattr(c, f.name)]
    raise ConfigTranslationError(
        f"LMConfig fields {diff} cannot be expressed in a {c.family} config.json "
        f"(values {[getattr(c, f) for f in diff]})"
    )
  return d
