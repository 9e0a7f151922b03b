"""Load and export reward models in the transformers sequence-classification layout.

`LlamaForSequenceClassification` (and the Qwen2/3, Gemma 1/2 and GPT-2 variants) store the
causal LM's backbone under the same names (`model.*`, GPT-2 `transformer.*`; the key tables of
`lm_keys`), no `lm_head`, and a head `score.weight` [num_labels, H] (bias-free), which maps
to `RewardModel.score.kernel` [H, 1] (layout "linear"). config.json is the causal LM's, with
`architectures` naming the classification class and the labels in `id2label` (transformers
writes no `num_labels`; without `id2label` its default is 2 labels). Only num_labels = 1
(a scalar reward) is accepted.

transformers reads the logit at the rightmost token that is not `pad_token_id`; alignjax reads
the last real token of a left-padded batch (`heads` eq. 1). The two agree when no real token
equals `pad_token_id` and padding is on the left for alignjax (on the right for transformers,
whose positions then need no mask-dependent offsets).

`load_hf_reward(directory)` builds the model abstractly and fills one tensor at a time onto its
target sharding, with `hf_lm`'s checks: every expected tensor present with its shape, every
stored tensor used. `save_hf_reward(directory, model)` writes what
`AutoModelForSequenceClassification.from_pretrained(directory)` loads.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from alignjax import parallel
from alignjax.models.convert import hf_lm, lm_keys
from alignjax.models.convert.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsCheckpoint,
    write_checkpoint,
)
from alignjax.models.heads import RewardModel, head_sharding_rules
from alignjax.models.lm_config import LMConfig, lm_config_from_hf, lm_config_to_hf

__all__ = ["ARCHITECTURES", "HEAD_KEY", "load_hf_reward", "save_hf_reward"]

ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
}
HEAD_KEY = "score.weight"
HEAD_PARAM = "score/kernel"
BACKBONE = "backbone/"


def _read_config(directory: str, dtype: str) -> tuple[LMConfig, dict]:
  path = os.path.join(directory, hf_lm.CONFIG_FILE)
  if not os.path.exists(path):  # hf_lm's clear errors for a non-checkpoint directory
    hf_lm.read_hf_config(directory, dtype=dtype)
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e
  archs = d.get("architectures") or []
  if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
    raise CheckpointError(
        f"{path}: architectures={archs} is not a sequence-classification (reward) model; "
        f"expected one of {sorted(ARCHITECTURES.values())} (a causal LM loads with load_hf_lm)"
    )
  source = "num_labels" if "num_labels" in d else "id2label" if "id2label" in d else "default"
  num_labels = d.pop("num_labels", len(d["id2label"]) if "id2label" in d else 2)
  if num_labels != 1:
    raise CheckpointError(
        f"{path}: num_labels={num_labels} (from {source}); a RewardModel needs num_labels=1 "
        f"(a scalar reward)"
    )
  return lm_config_from_hf(d, dtype=dtype), d


def _backbone_table(config: LMConfig) -> list[lm_keys.Rule]:
  return [r for r in lm_keys.key_table(config) if r.hf != lm_keys.TIED_COPY]


def load_hf_reward(
    directory: str, *, dtype: str = "float32", mesh=None, rules=None
) -> tuple[RewardModel, LMConfig]:
  """A `RewardModel` filled from a sequence-classification checkpoint directory, sharded over
  `mesh` by `rules` (default `head_sharding_rules()`; one device when `mesh` is None)."""
  config, _ = _read_config(directory, dtype)
  rules = head_sharding_rules() if rules is None else rules
  ckpt = SafetensorsCheckpoint(directory)
  if HEAD_KEY not in ckpt.tensors:
    raise CheckpointError(
        f"{directory}: checkpoint has no {HEAD_KEY!r} (the reward head); tensors start with "
        f"{sorted(ckpt.tensors)[:4]}"
    )
  table = _backbone_table(config)
  names = hf_lm._resolve_names(config, table, set(ckpt.tensors) - {HEAD_KEY}, directory)
  names[HEAD_KEY] = HEAD_KEY
  table = table + [lm_keys.Rule(HEAD_KEY, (HEAD_PARAM,), "linear")]
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: RewardModel(config, rngs=nnx.Rngs(0))))
  shapes = {parallel.path_str(p): v.get_value() for p, v in nnx.to_flat_state(abstract)}
  ours = lambda p: p if p == HEAD_PARAM else BACKBONE + p
  targets = sorted(ours(p) for r in table for p in r.ours)
  if targets != sorted(shapes):
    raise AssertionError(f"key table / model mismatch: {sorted(set(targets) ^ set(shapes))}")

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  values = {}
  for r in table:
    name, info = names[r.hf], ckpt.tensors[names[r.hf]]
    want = [shapes[ours(p)].shape for p in r.ours]
    expected = lm_keys.hf_shape(r.layout, want)
    if tuple(info.shape) != expected:
      extra = " (num_labels must be 1)" if r.hf == HEAD_KEY else ""
      raise CheckpointError(
          f"{os.path.join(directory, info.file)}: tensor {name!r} has shape "
          f"{tuple(info.shape)}, expected {expected} for this config{extra}"
      )
    for p, part in zip(r.ours, lm_keys.to_ours(r.layout, ckpt.get(name), want)):
      p = ours(p)
      part = part.astype(shapes[p].dtype, copy=False)
      sharding = (
          device
          if mesh is None
          else jax.sharding.NamedSharding(mesh, parallel.spec_for(p, part.shape, mesh, rules))
      )
      values[p] = jax.make_array_from_callback(
          part.shape, sharding, lambda idx, a=part: np.array(a[idx], copy=True)
      )
  state = nnx.from_flat_state(
      [
          (path, var.replace(values[parallel.path_str(path)]))
          for path, var in nnx.to_flat_state(abstract)
      ]
  )
  return nnx.merge(graphdef, state), config


def save_hf_reward(
    directory: str,
    model: RewardModel,
    *,
    dtype: str | None = None,
    pad_token_id: int | None = None,
    max_shard_bytes: int = hf_lm.DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> list[str]:
  """Write config.json + safetensors in the sequence-classification layout; returns the files.

  pad_token_id: written to config.json (default the model config's); transformers needs one to
    score batches of more than one sequence.
  """
  if not isinstance(model, RewardModel):
    raise TypeError(f"save_hf_reward: expected a RewardModel, got {type(model).__name__}")
  config: LMConfig = model.config
  out_dtype = dtype or config.dtype
  hf_config = lm_config_to_hf(LMConfig.from_dict({**config.to_dict(), "dtype": out_dtype}))
  pad = config.pad_token_id if pad_token_id is None else int(pad_token_id)
  hf_config.update(
      architectures=[ARCHITECTURES[config.family]],
      id2label={"0": "LABEL_0"},
      label2id={"LABEL_0": 0},
      pad_token_id=pad,
  )
  if not config.tie_embeddings:  # no lm_head in this layout; the flag is moot, keep it off
    hf_config["tie_word_embeddings"] = False
  os.makedirs(directory, exist_ok=True)
  stale = [
      f
      for f in os.listdir(directory)
      if f in (SINGLE_FILE, INDEX_FILE, hf_lm.CONFIG_FILE)
      or (f.startswith("model-") and f.endswith(".safetensors"))
  ]
  if stale and not overwrite:
    raise FileExistsError(f"{directory}: already holds {sorted(stale)}; pass overwrite=True")
  for f in stale:
    os.remove(os.path.join(directory, f))

  params = {
      parallel.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  table = [
      lm_keys.Rule(r.hf, tuple(BACKBONE + p for p in r.ours), r.layout)
      for r in _backbone_table(config)
  ] + [lm_keys.Rule(HEAD_KEY, (HEAD_PARAM,), "linear")]
  np_dtype = np.dtype(jax.numpy.dtype(out_dtype))
  rules = {r.hf: r for r in table}
  entries = [
      (k, np_dtype, lm_keys.hf_shape(r.layout, [params[p].shape for p in r.ours]))
      for k, r in rules.items()
  ]

  def produce(key):
    r = rules[key]
    return lm_keys.to_hf(r.layout, [hf_lm._to_host(params[p]) for p in r.ours]).astype(np_dtype)

  written = write_checkpoint(directory, entries, produce, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(directory, hf_lm.CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return [hf_lm.CONFIG_FILE] + written
