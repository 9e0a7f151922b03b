"""LoRA on the Stable Diffusion UNet's attention projections, in diffusers' LoRA file format.

The adapter is `alignjax.models.lora`'s (the one the LM uses): for each targeted Linear kernel
W [in, out], A [in, r] and B [r, out], merged as W' = W + (α / r) A B (lora eq. 2). As
diffusers and PEFT do for Stable Diffusion, the targets are the attention projections by name:
`to_q`, `to_k`, `to_v` and `to_out.0` of every self- and cross-attention (attn1, attn2) of
the UNet's transformer blocks.

The file is what `StableDiffusionPipeline.save_lora_weights` writes and `load_lora_weights`
reads: `pytorch_lora_weights.safetensors` with, per target module m (diffusers' dotted module
path, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q),

    unet.<m>.lora_A.weight = A^T [r, in],    unet.<m>.lora_B.weight = B^T [out, r]     (1)

and the safetensors metadata entry "lora_adapter_metadata": JSON of PEFT's LoraConfig fields
prefixed "unet." (r, lora_alpha, target_modules, use_rslora), so that α survives the trip.
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from alignjax.models import lora as lora_lib
from alignjax.models.convert.safetensors_io import CheckpointError

LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIX = "unet."
UNET_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def unet_lora_target(modules: Sequence[str] = UNET_LORA_MODULES) -> str:
  """The regex over our parameter paths that selects the named attention projections."""
  modules = (modules,) if isinstance(modules, str) else tuple(modules)
  unknown = [m for m in modules if m not in UNET_LORA_MODULES]
  if not modules or unknown:
    raise ValueError(
        f"UNet LoRA modules {list(modules)}: unknown {unknown}; valid: {list(UNET_LORA_MODULES)}"
    )
  names = "|".join(re.escape(m.replace(".", "/")) for m in modules)
  return rf"(^|/)attn[12]/({names})/kernel$"


def init_unet_lora(
    unet: nnx.Module,
    rank: int,
    key: jax.Array,
    *,
    modules: Sequence[str] = UNET_LORA_MODULES,
    init: str = "kaiming",
) -> dict:
  """LoRA factors {path: {"a", "b"}} for the UNet's attention projections (B = 0)."""
  params = nnx.state(unet, nnx.Param)
  return lora_lib.init_lora(params, rank, key, target=unet_lora_target(modules), init=init)


def _module_name(path: str) -> str:
  """Our kernel path -> diffusers' module path: a/0/attn1/to_out/0/kernel -> a.0.attn1.to_out.0"""
  if not path.endswith("/kernel"):
    raise ValueError(f"LoRA entry {path!r} is not a kernel")
  return path[: -len("/kernel")].replace("/", ".")


def _modules_of(lora: dict) -> list[str]:
  """The PEFT target_modules names (to_q, ..., to_out.0) of the LoRA entries."""
  found = set()
  for path in lora:
    m = re.search(r"attn[12]/(to_q|to_k|to_v|to_out/0)/kernel$", path)
    if m is None:
      raise ValueError(f"LoRA entry {path!r} is not a UNet attention projection")
    found.add(m.group(1).replace("/", "."))
  return sorted(found)


def save_unet_lora(
    directory: str,
    lora: dict,
    *,
    alpha: float,
    rslora: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
) -> str:
  """Write `lora` (from `init_unet_lora`, trained) as diffusers' LoRA file; returns its path."""
  if not lora:
    raise ValueError("save_unet_lora: no LoRA entries")
  ranks = {int(p["a"].shape[1]) for p in lora.values()}
  if len(ranks) != 1:
    raise ValueError(f"save_unet_lora: entries have different ranks {sorted(ranks)}")
  path = os.path.join(directory, LORA_FILE)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True")
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  tensors = {}
  for name, pair in sorted(lora.items()):
    module = PREFIX + _module_name(name)
    a, b = (np.asarray(jax.device_get(pair[k]), np.float32) for k in ("a", "b"))
    tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T).astype(np_dtype)  # eq. 1
    tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T).astype(np_dtype)
  (rank,) = ranks
  config = {"r": rank, "lora_alpha": alpha, "target_modules": _modules_of(lora)}
  config["use_rslora"] = bool(rslora)
  metadata = {"format": "pt", METADATA_KEY: json.dumps({PREFIX + k: v for k, v in config.items()})}
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, path + ".partial", metadata=metadata)
  os.replace(path + ".partial", path)
  return path


def load_unet_lora(path: str, unet: nnx.Module) -> tuple[dict, float, bool]:
  """(lora, alpha, rslora) from a diffusers LoRA file (or the directory holding it) for `unet`.

  Refuses, naming the file, a key that is not a UNet LoRA factor, a module this UNet does not
  have, and factors whose shapes do not fit the module's kernel. Without metadata α = r (the
  scale diffusers then assumes).
  """
  if os.path.isdir(path):
    path = os.path.join(path, LORA_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such LoRA file")
  with safe_open(path, framework="np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = f.metadata() or {}
  shapes = {
      lora_lib.path_str(p): tuple(v.get_value().shape)
      for p, v in nnx.to_flat_state(nnx.state(unet, nnx.Param))
  }
  pattern = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$")
  lora: dict = {}
  for key in sorted(tensors):
    m = pattern.match(key)
    if not m:
      raise CheckpointError(f"{path}: {key!r} is not a UNet LoRA factor (unet.<module>.lora_A/B)")
    ours = m.group(1).replace(".", "/") + "/kernel"
    if ours not in shapes:
      raise CheckpointError(f"{path}: {key!r} names module {m.group(1)!r}, which this UNet lacks")
    fan_in, fan_out = shapes[ours]
    value = tensors[key].astype(np.float32)
    side = "a" if m.group(2) == "A" else "b"
    if value.ndim != 2 or (side == "a" and value.shape[1] != fan_in):
      raise CheckpointError(
          f"{path}: {key!r} has shape {value.shape}; the module's kernel is [in {fan_in}, "
          f"out {fan_out}], so lora_A must be [r, {fan_in}]"
      )
    if side == "b" and value.shape[0] != fan_out:
      raise CheckpointError(
          f"{path}: {key!r} has shape {value.shape}; lora_B must be [{fan_out}, r] for this UNet"
      )
    lora.setdefault(ours, {})[side] = jax.numpy.asarray(value.T)
  for name, pair in lora.items():
    if set(pair) != {"a", "b"} or pair["a"].shape[1] != pair["b"].shape[0]:
      raise CheckpointError(f"{path}: module {_module_name(name)!r} lacks a matching A/B pair")
  config = json.loads(metadata.get(METADATA_KEY, "{}"))
  rank = next(iter(lora.values()))["a"].shape[1]
  alpha = float(config.get(PREFIX + "lora_alpha", rank))
  return lora, alpha, bool(config.get(PREFIX + "use_rslora", False))
