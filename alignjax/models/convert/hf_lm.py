"""Load HF transformers LM checkpoints into `TransformerLM` and export them back.

`load_hf_lm(directory)` reads config.json (translated strictly by `lm_config_from_hf`), builds
the model abstractly (`nnx.eval_shape`, no memory), then fills each parameter from the
safetensors checkpoint one HF tensor at a time: memory-mapped read -> layout transform
(`lm_keys`) -> `jax.make_array_from_callback` onto the parameter's target sharding, so only
one tensor is ever held on the host and each device receives only its shard. Checks, in both
directions: every HF tensor the key table expects exists with the expected shape, and every
tensor in the checkpoint is used (non-parameter buffers listed in `lm_keys.IGNORED` aside);
a tied-embedding checkpoint that also stores `lm_head.weight` must store the same matrix.

`save_hf_lm(directory, model)` writes the family's own config.json and safetensors (sharded
with an index above `max_shard_bytes`), fetching one parameter at a time; transformers'
`AutoModelForCausalLM.from_pretrained(directory)` loads the result.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding

from alignjax import parallel
from alignjax.models.convert import lm_keys
from alignjax.models.convert.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsCheckpoint,
    write_checkpoint,
)
from alignjax.models.lm import LM_SHARDING_RULES, TransformerLM
from alignjax.models.lm_config import (HARMLESS_KEYS, LMConfig, lm_config_from_hf, lm_config_to_hf)
from alignjax.parallel import path_str

CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def read_hf_config(directory: str, *, dtype: str = "float32") -> LMConfig:
  """`LMConfig` from directory/config.json; clear errors for a non-checkpoint directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: not a directory")
  if not os.path.exists(path):
    raise CheckpointError(f"{directory}: not a supported checkpoint (no {CONFIG_FILE})")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e
  return lm_config_from_hf(d, dtype=dtype)


def abstract_lm(config: LMConfig):
  """(graphdef, abstract state) of `TransformerLM(config)` without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0))))


def _resolve_names(config: LMConfig, table, present: set[str], directory: str) -> dict[str, str]:
  """HF table name -> name in this checkpoint; refuses missing and unused tensors."""
  prefix = lm_keys.OPTIONAL_PREFIX.get(config.family)
  names, missing = {}, []
  for r in table:
    if r.hf in present:
      names[r.hf] = r.hf
    elif prefix and r.hf.startswith(prefix) and r.hf[len(prefix) :] in present:
      names[r.hf] = r.hf[len(prefix) :]
    else:
      missing.append(r.hf)
  if missing:
    raise CheckpointError(
        f"{directory}: checkpoint lacks {len(missing)} tensor(s) the "
        f"{config.family} config needs: {missing[:8]}"
    )
  ignored = lm_keys.IGNORED[config.family]
  unused = sorted(
      n
      for n in present - set(names.values())
      if not ignored.fullmatch(n) and not (config.tie_embeddings and n == lm_keys.TIED_COPY)
  )
  if unused:
    raise CheckpointError(
        f"{directory}: checkpoint has {len(unused)} tensor(s) this "
        f"{config.family} config does not use: {unused[:8]}"
    )
  return names


def load_hf_lm(
    directory: str, *, dtype: str = "float32", mesh=None, rules=LM_SHARDING_RULES
) -> tuple[TransformerLM, LMConfig]:
  """A `TransformerLM` filled from an HF checkpoint directory, sharded over `mesh` by `rules`
  (all parameters on the default device when `mesh` is None)."""
  config = read_hf_config(directory, dtype=dtype)
  ckpt = SafetensorsCheckpoint(directory)
  table = lm_keys.key_table(config)
  names = _resolve_names(config, table, set(ckpt.tensors), directory)
  graphdef, abstract = abstract_lm(config)
  flat = [(path_str(path), var) for path, var in nnx.to_flat_state(abstract)]
  shapes = {p: var.get_value() for p, var in flat}
  targets = [p for r in table for p in r.ours]
  if sorted(targets) != sorted(shapes):  # the table and the model must agree exactly
    raise AssertionError(f"key table / model mismatch: {sorted(set(targets) ^ set(shapes))}")

  device = SingleDeviceSharding(jax.devices()[0])
  values = {}
  for r in table:
    name = names[r.hf]
    info = ckpt.tensors[name]
    expected = lm_keys.hf_shape(r.layout, [shapes[p].shape for p in r.ours])
    if tuple(info.shape) != expected:
      raise CheckpointError(
          f"{os.path.join(directory, info.file)}: tensor {name!r} has shape "
          f"{tuple(info.shape)}, expected {expected} for this config"
      )
    parts = lm_keys.to_ours(r.layout, ckpt.get(name), [shapes[p].shape for p in r.ours])
    for p, part in zip(r.ours, parts):
      part = part.astype(shapes[p].dtype, copy=False)  # still a memory-map view when possible
      sharding = (
          device
          if mesh is None
          else jax.sharding.NamedSharding(mesh, parallel.spec_for(p, part.shape, mesh, rules))
      )
      # Each device gets a private copy of its shard, never an alias of the read-only map.
      values[p] = jax.make_array_from_callback(
          part.shape, sharding, lambda idx, a=part: np.array(a[idx], copy=True)
      )
  if config.tie_embeddings and lm_keys.TIED_COPY in ckpt.tensors:
    embed = ckpt.get(names[table[0].hf])
    if not np.array_equal(ckpt.get(lm_keys.TIED_COPY), embed):
      raise CheckpointError(
          f"{directory}: tie_word_embeddings is true but "
          f"{lm_keys.TIED_COPY!r} differs from {names[table[0].hf]!r}"
      )
  state = nnx.from_flat_state(
      [(path, var.replace(values[path_str(path)])) for path, var in nnx.to_flat_state(abstract)]
  )
  return nnx.merge(graphdef, state), config


def _to_host(x) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array on this host."""
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_hf_lm(
    directory: str,
    model: TransformerLM,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> list[str]:
  """Write config.json + safetensors that transformers loads; returns the files written.

  dtype: stored dtype ("float32", "bfloat16", "float16"; default the model's).
  extra_config: harmless config.json keys to carry over, e.g. the source checkpoint's dropout
    rates (`HARMLESS_KEYS` only; keys the architecture defines are written from the model).
  """
  config: LMConfig = model.config
  out_dtype = dtype or config.dtype
  hf_config = lm_config_to_hf(LMConfig.from_dict({**config.to_dict(), "dtype": out_dtype}))
  extra = dict(extra_config or {})
  refused = sorted(set(extra) - HARMLESS_KEYS)
  if refused:
    raise ValueError(
        f"save_hf_lm: extra_config keys {refused} are not harmless metadata; "
        f"allowed: {sorted(HARMLESS_KEYS)}"
    )
  hf_config.update(
      {k: v for k, v in extra.items() if k not in hf_config and k not in ("dtype", "torch_dtype")}
  )
  os.makedirs(directory, exist_ok=True)
  stale = [
      f
      for f in os.listdir(directory)
      if f in (SINGLE_FILE, INDEX_FILE, CONFIG_FILE)
      or (f.startswith("model-") and f.endswith(".safetensors"))
  ]
  if stale and not overwrite:
    raise FileExistsError(f"{directory}: already holds {sorted(stale)}; pass overwrite=True")
  for f in stale:
    os.remove(os.path.join(directory, f))

  params = {
      path_str(path): var.get_value()
      for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  np_dtype = np.dtype(jax.numpy.dtype(out_dtype))
  rules = {r.hf: r for r in lm_keys.key_table(config)}
  entries = [
      (k, np_dtype, lm_keys.hf_shape(r.layout, [params[p].shape for p in r.ours]))
      for k, r in rules.items()
  ]

  def produce(key):
    r = rules[key]
    arrays = [_to_host(params[p]) for p in r.ours]
    return lm_keys.to_hf(r.layout, arrays).astype(np_dtype)

  written = write_checkpoint(directory, entries, produce, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return [CONFIG_FILE] + written
