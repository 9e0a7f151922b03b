"""Key tables: HF transformers tensor names <-> `TransformerLM` parameter paths.

A `Rule(hf, ours, layout, when)` maps one HF tensor to one or more parameters ("{i}" stands
for the layer index); `when` names an `LMConfig` flag that must be true ("!flag": false).
Layouts, our shape <-> HF shape (torch Linear weights are [out, in]; GPT-2's Conv1D is
already [in, out]):

    same        identical                                (norms, embeddings, GPT-2 MLP)
    flat        [N, D]          <-> [N*D]                 (q/k/v biases)
    linear      [in, *out]      <-> [prod(out), in]       (q/k/v, MLP, lm_head weights)
    linear_in2  [N, D, out]     <-> [out, N*D]            (o_proj weight)
    merge_in2   [N, D, out]     <-> [N*D, out]            (GPT-2 attn.c_proj weight)
    qkv         3 x [..., N, D] <-> [..., 3*N*D]          (GPT-2 attn.c_attn weight and bias)
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from alignjax.models.lm_config import LMConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  ours: tuple[str, ...]
  layout: str = "same"
  when: str | None = None


def _hf_shape(layout: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
  s = shapes[0]
  if layout == "same":
    return s
  if layout == "flat":
    return (int(np.prod(s)),)
  if layout == "linear":
    return (int(np.prod(s[1:])), s[0])
  if layout == "linear_in2":
    return (s[2], s[0] * s[1])
  if layout == "merge_in2":
    return (s[0] * s[1], s[2])
  if layout == "qkv":
    return s[:-2] + (sum(x[-2] * x[-1] for x in shapes),)
  raise ValueError(f"unknown layout {layout!r}")


def to_ours(layout: str, hf: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
  """One HF tensor -> our parameter arrays (shapes given)."""
  if layout in ("same", "flat", "merge_in2"):
    return [hf.reshape(shapes[0])]
  if layout in ("linear", "linear_in2"):
    return [hf.T.reshape(shapes[0])]
  if layout == "qkv":
    sizes = np.cumsum([s[-2] * s[-1] for s in shapes])[:-1]
    return [p.reshape(s) for p, s in zip(np.split(hf, sizes, axis=-1), shapes)]
  raise ValueError(f"unknown layout {layout!r}")


def to_hf(layout: str, ours: list[np.ndarray]) -> np.ndarray:
  """Our parameter arrays -> one HF tensor (inverse of `to_ours`)."""
  shape = _hf_shape(layout, [tuple(x.shape) for x in ours])
  x = ours[0]
  if layout in ("same", "flat", "merge_in2"):
    return x.reshape(shape)
  if layout in ("linear", "linear_in2"):
    return x.reshape(shape[::-1]).T
  if layout == "qkv":
    return np.concatenate([p.reshape(p.shape[:-2] + (-1,)) for p in ours], axis=-1)
  raise ValueError(f"unknown layout {layout!r}")


def hf_shape(layout: str, shapes) -> tuple[int, ...]:
  return _hf_shape(layout, [tuple(s) for s in shapes])


def _llama_like() -> tuple[list[Rule], list[Rule]]:
  top = [
      Rule("model.embed_tokens.weight", ("embed/embedding",)),
      Rule("model.norm.weight", ("final_norm/scale",)),
      Rule("lm_head.weight", ("lm_head/kernel",), "linear", "!tie_embeddings"),
  ]
  hf, us = "model.layers.{i}.", "layers/{i}/"
  layer = [
      Rule(hf + "input_layernorm.weight", (us + "attn_norm/scale",)),
      Rule(hf + "post_attention_layernorm.weight", (us + "mlp_norm/scale",), when="!post_norms"),
      Rule(
          hf + "post_attention_layernorm.weight", (us + "post_attn_norm/scale",), when="post_norms"
      ),
      Rule(hf + "pre_feedforward_layernorm.weight", (us + "mlp_norm/scale",), when="post_norms"),
      Rule(
          hf + "post_feedforward_layernorm.weight", (us + "post_mlp_norm/scale",), when="post_norms"
      ),
      Rule(hf + "self_attn.o_proj.weight", (us + "attn/o/kernel",), "linear_in2"),
      Rule(hf + "self_attn.o_proj.bias", (us + "attn/o/bias",), when="o_bias"),
      Rule(hf + "self_attn.q_norm.weight", (us + "attn/q_norm/scale",), when="qk_norm"),
      Rule(hf + "self_attn.k_norm.weight", (us + "attn/k_norm/scale",), when="qk_norm"),
  ]
  for n in ("q", "k", "v"):
    layer += [
        Rule(hf + f"self_attn.{n}_proj.weight", (us + f"attn/{n}/kernel",), "linear"),
        Rule(hf + f"self_attn.{n}_proj.bias", (us + f"attn/{n}/bias",), "flat", "qkv_bias"),
    ]
  for n in ("gate", "up", "down"):
    layer += [
        Rule(hf + f"mlp.{n}_proj.weight", (us + f"mlp/{n}/kernel",), "linear"),
        Rule(hf + f"mlp.{n}_proj.bias", (us + f"mlp/{n}/bias",), "same", "mlp_bias"),
    ]
  return top, layer


def _gpt2() -> tuple[list[Rule], list[Rule]]:
  t = "transformer."
  top = [
      Rule(t + "wte.weight", ("embed/embedding",)),
      Rule(t + "wpe.weight", ("pos_embed/embedding",)),
      Rule(t + "ln_f.weight", ("final_norm/scale",)),
      Rule(t + "ln_f.bias", ("final_norm/bias",)),
      Rule("lm_head.weight", ("lm_head/kernel",), "linear", "!tie_embeddings"),
  ]
  hf, us = t + "h.{i}.", "layers/{i}/"
  qkv = tuple(us + f"attn/{n}/" for n in "qkv")
  layer = [
      Rule(hf + "ln_1.weight", (us + "attn_norm/scale",)),
      Rule(hf + "ln_1.bias", (us + "attn_norm/bias",)),
      Rule(hf + "attn.c_attn.weight", tuple(p + "kernel" for p in qkv), "qkv"),
      Rule(hf + "attn.c_attn.bias", tuple(p + "bias" for p in qkv), "qkv"),
      Rule(hf + "attn.c_proj.weight", (us + "attn/o/kernel",), "merge_in2"),
      Rule(hf + "attn.c_proj.bias", (us + "attn/o/bias",)),
      Rule(hf + "ln_2.weight", (us + "mlp_norm/scale",)),
      Rule(hf + "ln_2.bias", (us + "mlp_norm/bias",)),
      Rule(hf + "mlp.c_fc.weight", (us + "mlp/up/kernel",)),
      Rule(hf + "mlp.c_fc.bias", (us + "mlp/up/bias",)),
      Rule(hf + "mlp.c_proj.weight", (us + "mlp/down/kernel",)),
      Rule(hf + "mlp.c_proj.bias", (us + "mlp/down/bias",)),
  ]
  return top, layer


TABLES = {
    "llama": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(),
    "gemma2": _llama_like(),
    "gpt2": _gpt2(),
}

# Non-parameter buffers that some checkpoints carry; skipped on load.
IGNORED = {
    "gpt2": re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)"),
    **{
        f: re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
        for f in ("llama", "qwen2", "qwen3", "gemma", "gemma2")
    },
}
# Older GPT-2 checkpoints (e.g. the original release) name tensors without this prefix.
OPTIONAL_PREFIX = {"gpt2": "transformer."}
# With tied embeddings, a checkpoint may still carry a copy of the output matrix.
TIED_COPY = "lm_head.weight"


def _applies(rule: Rule, c: LMConfig) -> bool:
  if rule.when is None:
    return True
  negate = rule.when.startswith("!")
  return bool(getattr(c, rule.when.lstrip("!"))) != negate


def key_table(c: LMConfig) -> list[Rule]:
  """The rules for this config, layer templates expanded, in checkpoint order."""
  top, layer = TABLES[c.family]
  rules = [r for r in top[:1] if _applies(r, c)]
  for i in range(c.num_layers):
    rules += [
        Rule(r.hf.format(i=i), tuple(p.format(i=i) for p in r.ours), r.layout, r.when)
        for r in layer
        if _applies(r, c)
    ]
  return rules + [r for r in top[1:] if _applies(r, c)]
