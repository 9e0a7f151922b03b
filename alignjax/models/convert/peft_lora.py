"""LoRA of a `TransformerLM` <-> Hugging Face PEFT adapter directories, and merged export.

A PEFT LoRA adapter directory holds adapter_config.json (peft_type "LORA", r, lora_alpha,
target_modules, ...) and adapter_model.safetensors with, per adapted torch Linear `m`,

    base_model.model.{m}.lora_A.weight  [r, in]       = A^T
    base_model.model.{m}.lora_B.weight  [out, r]      = B^T                             (eq. 1)

where A [fan_in, r], B [r, fan_out] are our factors (`alignjax.models.lora`, eq. 1 there). The
modules `m` and the in/out flattening come from the key table (`lm_keys`): a kernel with
layout "linear" ([in, *out] <-> weight [prod(out), in]) or "linear_in2" ([N, D, out] <->
[out, N*D]) flattens its in- and out-axes row-major exactly as the torch weight does, so PEFT's
W_hf + s * lora_B @ lora_A is our merged kernel (lora eq. 2) in torch layout, with the same
s = lora_alpha / r (or / sqrt(r) with use_rslora).

Only the Llama-like families (Llama, Qwen2/3, Gemma 1/2) export: GPT-2 fuses q, k and v into
one Conv1D `c_attn`, where separate q/k/v adapters have no same-rank PEFT equivalent.
`save_merged_hf_lm` writes the base with the adapter merged in as a transformers checkpoint
(any family). `load_peft_adapter` reads an adapter back, strictly: every tensor the config's
target_modules implies must be present with the expected shape, and no other tensor.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.models import lora
from alignjax.models.convert import lm_keys
from alignjax.models.convert.hf_lm import abstract_lm, save_hf_lm
from alignjax.models.convert.safetensors_io import (
    _DTYPES,
    CheckpointError,
    _header_bytes,
    _read_header,
)
from alignjax.models.lm_config import LMConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_NUM_IN = {"linear": 1, "linear_in2": 2}
_UNSUPPORTED = {  # adapter_config.json settings that change the adapter's meaning
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "target_parameters": (None, []),
    "exclude_modules": (None, [], ""),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


def lora_modules(config: LMConfig) -> dict[str, tuple[str, int]]:
  """{our kernel path: (HF module name, number of input axes)} of every kernel PEFT can adapt
  (the "linear" / "linear_in2" rules of the key table)."""
  if config.family == "gpt2":
    raise NotImplementedError(
        "PEFT LoRA export/import is not supported for GPT-2: it fuses q, k and v into one "
        "Conv1D attn.c_attn, so separate q/k/v adapters have no same-rank PEFT equivalent; "
        "export the merged model with save_merged_hf_lm instead"
    )
  out = {}
  for r in lm_keys.key_table(config):
    if r.layout in _NUM_IN and r.hf.endswith(".weight") and r.ours[0].endswith("/kernel"):
      out[r.ours[0]] = (r.hf[: -len(".weight")], _NUM_IN[r.layout])
  return out


def _target_modules(modules: list[str], all_modules: list[str]) -> list[str] | str:
  """PEFT target_modules selecting exactly `modules`: short names (q_proj, ...) when each one
  is adapted in every layer, else a regex of the full module names."""
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  implied = [m for m in all_modules if m.rsplit(".", 1)[-1] in short]
  if sorted(implied) == sorted(modules):
    return short
  return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def _selected(target_modules, all_modules: list[str]) -> list[str]:
  """The modules PEFT adapts for `target_modules` (a list of name suffixes, or a regex)."""
  if isinstance(target_modules, str):
    return [m for m in all_modules if re.fullmatch(target_modules, m)]
  if not isinstance(target_modules, (list, tuple)) or not target_modules:
    raise CheckpointError(f"target_modules={target_modules!r}: need a non-empty list or a regex")
  return [m for m in all_modules if any(m == t or m.endswith("." + t) for t in target_modules)]


def save_peft_adapter(
    directory: str,
    config: LMConfig,
    lora_params,
    *,
    alpha: float | None = None,
    rslora: bool = False,
    base_model_name_or_path: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> list[str]:
  """Write `lora_params` of a `TransformerLM(config)` as a PEFT adapter directory (eq. 1);
  `PeftModel.from_pretrained(hf_model, directory)` then computes our merged-LoRA model.

  alpha, rslora: as given to `lora.merge_lora` (alpha=None: scale 1, written as lora_alpha = r,
    or sqrt(r) with rslora). dtype: stored dtype (default the factors'). Returns the files.
  """
  modules = lora_modules(config)
  unknown = sorted(set(lora_params) - set(modules))
  if unknown:
    raise ValueError(
        f"save_peft_adapter: LoRA entries {unknown} are not PEFT-adaptable kernels of this "
        f"{config.family} model; adaptable: {sorted(modules)[:10]} ..."
    )
  if not lora_params:
    raise ValueError("save_peft_adapter: lora_params is empty")
  ranks = {name: int(p["a"].shape[-1]) for name, p in lora_params.items()}
  if len(set(ranks.values())) != 1:
    raise ValueError(f"save_peft_adapter: factors have different ranks {ranks}; PEFT needs one r")
  rank = next(iter(ranks.values()))
  _, abstract = abstract_lm(config)
  shapes = {lora.path_str(p): tuple(v.shape) for p, v in _flat(abstract)}
  tensors = {}
  for name, pair in sorted(lora_params.items()):
    module, num_in = modules[name]
    fan_in, fan_out = lora.fans(shapes[name], num_in)
    a, b = np.asarray(pair["a"]), np.asarray(pair["b"])
    if a.shape != (fan_in, rank) or b.shape != (rank, fan_out):
      raise ValueError(
          f"save_peft_adapter: {name}: A {a.shape} / B {b.shape}; kernel {shapes[name]} with "
          f"{num_in} input axes needs A [{fan_in}, {rank}], B [{rank}, {fan_out}]"
      )
    out_dtype = np.dtype(_np_dtype(dtype) if dtype else a.dtype)
    tensors[PREFIX + module + ".lora_A.weight"] = a.T.astype(out_dtype)
    tensors[PREFIX + module + ".lora_B.weight"] = b.T.astype(out_dtype)

  if alpha is None:
    alpha = float(rank) ** 0.5 if rslora else rank
  adapted = [modules[n][0] for n in lora_params]
  adapter_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": rank,
      "lora_alpha": alpha,
      "use_rslora": bool(rslora),
      "target_modules": _target_modules(adapted, [m for m, _ in modules.values()]),
      "base_model_name_or_path": base_model_name_or_path,
      "bias": "none",
      "lora_dropout": 0.0,
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "use_dora": False,
      "revision": None,
  }
  os.makedirs(directory, exist_ok=True)
  stale = [
      f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if os.path.exists(os.path.join(directory, f))
  ]
  if stale and not overwrite:
    raise FileExistsError(f"{directory}: already holds {stale}; pass overwrite=True")
  path = os.path.join(directory, ADAPTER_WEIGHTS)
  header, _ = _header_bytes([(k, v.dtype, v.shape) for k, v in tensors.items()])
  with open(path + ".partial", "wb") as f:
    f.write(header)
    for v in tensors.values():
      f.write(np.ascontiguousarray(v).tobytes())
  os.replace(path + ".partial", path)
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(adapter_config, f, indent=2, sort_keys=True)
  return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def _flat(state):
  return jax.tree_util.tree_flatten_with_path(state)[0]


def _np_dtype(name: str) -> np.dtype:
  choices = ("float32", "bfloat16", "float16")
  if name not in choices:
    raise ValueError(f"dtype={name!r}; valid choices: {choices}")
  return np.dtype(jnp.dtype(name))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  header, start = _read_header(path)
  header.pop("__metadata__", None)
  raw = np.memmap(path, np.uint8, "r")
  out = {}
  for key, info in header.items():
    if info.get("dtype") not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')}")
    dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
    begin, end = info["data_offsets"]
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise CheckpointError(f"{path}: tensor {key!r} size does not match {shape} {dtype}")
    out[key] = np.array(raw[start + begin : start + end].view(dtype).reshape(shape))
  return out


def load_peft_adapter(directory: str, config: LMConfig, *, dtype: str = "float32"):
  """A PEFT LoRA adapter directory -> (lora_params, merge kwargs {"alpha", "rslora"}) for a
  `TransformerLM(config)`, so `lora.merge_lora(base, lora_params, **kwargs)` is what PEFT
  computes. Strict: settings that change the adapter's meaning (DoRA, biases, per-module
  ranks, ...) are refused, and the tensors must be exactly those target_modules implies."""
  cfg_path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{directory}: not a PEFT adapter (no {ADAPTER_CONFIG})")
  with open(cfg_path) as f:
    cfg = json.load(f)
  if cfg.get("peft_type") != "LORA":
    raise CheckpointError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}; only 'LORA' loads")
  for key, allowed in _UNSUPPORTED.items():
    if key in cfg and cfg[key] not in allowed:
      raise CheckpointError(
          f"{cfg_path}: {key}={cfg[key]!r} is not supported (allowed: {list(allowed)})"
      )
  rank, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
  if not isinstance(rank, int) or rank <= 0:
    raise CheckpointError(f"{cfg_path}: r={rank!r} must be a positive int")
  if not isinstance(alpha, (int, float)):
    raise CheckpointError(f"{cfg_path}: lora_alpha={alpha!r} must be a number")
  modules = lora_modules(config)
  by_module = {m: (path, k) for path, (m, k) in modules.items()}
  selected = _selected(cfg.get("target_modules"), sorted(by_module))
  if not selected:
    raise CheckpointError(
        f"{cfg_path}: target_modules={cfg.get('target_modules')!r} selects no module of this "
        f"{config.family} model; modules: {sorted(by_module)[:10]} ..."
    )
  tensors = _read_safetensors(os.path.join(directory, ADAPTER_WEIGHTS))
  expected = {PREFIX + m + f".lora_{x}.weight" for m in selected for x in "AB"}
  missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unknown:
    raise CheckpointError(
        f"{directory}: adapter tensors do not match target_modules "
        f"{cfg.get('target_modules')!r}: missing {missing[:8]}, unknown {unknown[:8]}"
    )
  _, abstract = abstract_lm(config)
  shapes = {lora.path_str(p): tuple(v.shape) for p, v in _flat(abstract)}
  np_dtype = _np_dtype(dtype)
  params = {}
  for m in selected:
    path, num_in = by_module[m]
    fan_in, fan_out = lora.fans(shapes[path], num_in)
    a, b = (tensors[PREFIX + m + f".lora_{x}.weight"] for x in "AB")
    if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
      raise CheckpointError(
          f"{directory}: {m}: lora_A {a.shape} / lora_B {b.shape}, expected "
          f"[{rank}, {fan_in}] / [{fan_out}, {rank}] for r={rank} and this config"
      )
    params[path] = {"a": np.ascontiguousarray(a.T).astype(np_dtype), "b": b.T.astype(np_dtype)}
  params = {k: {n: jnp.asarray(v) for n, v in p.items()} for k, p in params.items()}
  return params, {"alpha": float(alpha), "rslora": bool(cfg.get("use_rslora", False))}


def save_merged_hf_lm(
    directory: str,
    model: nnx.Module,
    lora_params,
    *,
    alpha: float | None = None,
    rslora: bool = False,
    **save_kwargs,
) -> list[str]:
  """`save_hf_lm` of the model with the adapter merged in (lora eq. 2): a plain transformers
  checkpoint. save_kwargs go to `save_hf_lm` (dtype, overwrite, extra_config, ...)."""
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, lora.merge_lora(state, lora_params, alpha=alpha, rslora=rslora))
  return save_hf_lm(directory, merged, **save_kwargs)
