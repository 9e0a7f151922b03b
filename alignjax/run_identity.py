"""Run identity: what a checkpoint records about the run that wrote it, and what may change.

A checkpoint's metadata (`run_metadata`) names the script that wrote it, the identity of the
frozen models and reward (paths and content hashes) and the full config as JSON. On resume
the stored and the current metadata are compared key by key (`compare`):

  * a different script (algorithm), model or reward identity, or a different value of any
    config field that changes what the run computes (model, reward, algorithm settings,
    fine-tuning mode, batch sizes, optimizer, seed, evaluation) is refused;
  * the config fields in OPERATIONAL_CONFIG_KEYS only say how the run is operated, so they
    may change on resume (a warning lists them): a longer schedule, other checkpoint,
    logging and image intervals, another mesh shape or number of processes (the global batch
    sizes are separate fields, so they stay fixed), how often the held-out curve is evaluated,
    compiler options, the finite-check policy.

Patterns are dotted config paths; "x.*" matches every field below section x.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Mapping
from typing import Any

OPERATIONAL_CONFIG_KEYS = (
    "num_rounds",  # DDPO
    "num_updates",  # DRaFT
    "num_iterations",  # Adjoint Matching
    "checkpoint.*",
    "log.*",
    "eval.every",  # how often the held-out curve is drawn; its seeds and sizes are fixed
    "mesh.*",
    "distributed.*",
    "compiler_options",
    "compiler_options.*",
    "finite.*",
    "model.cache_dir",  # where the base model is cached; its content hash is compared
)

_MISSING = "<missing>"


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
  """ "sha256:<hex>" identifying a file or a directory's contents.

  A file: the sha256 of its bytes (what `sha256sum` prints). A directory: the sha256 of
  the lines "<relative path>\\0<file sha256>\\n" over its files in sorted order, so
  renaming, adding, removing or changing any file changes the hash.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return "sha256:" + _file_sha256(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"content_hash: {path} does not exist")
  files = sorted(
      (
          os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/"),
          os.path.join(root, name),
      )
      for root, _, names in os.walk(path)
      for name in names
  )
  digest = hashlib.sha256()
  for rel, full in files:
    digest.update(f"{rel}\0{_file_sha256(full)}\n".encode())
  return "sha256:" + digest.hexdigest()


def frozen_model_metadata(path: str | os.PathLike) -> dict:
  """{"path", "hash"} that identifies a frozen model directory or file in metadata."""
  return {"path": os.path.abspath(os.fspath(path)), "hash": content_hash(path)}


def run_metadata(script: str, config: Any, **identity: Any) -> dict:
  """{"script", "config" (a plain dict), **identity} for `Checkpointer(metadata=...)`.

  `script` is the module that writes the checkpoint (e.g. "experiments.ddpo"); `identity`
  holds what the config cannot say on its own, e.g. base_model=frozen_model_metadata(path).
  """
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return {"script": script, "config": config, **identity}


def is_operational(path: str, patterns=OPERATIONAL_CONFIG_KEYS) -> bool:
  """Whether the dotted config `path` may differ on resume."""
  return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _leaf_diffs(stored: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
  if isinstance(stored, Mapping) and isinstance(current, Mapping):
    out = []
    for key in sorted(set(stored) | set(current)):
      path = f"{prefix}.{key}" if prefix else str(key)
      out += _leaf_diffs(stored.get(key, _MISSING), current.get(key, _MISSING), path)
    return out
  return [] if stored == current else [(prefix, stored, current)]


def compare(
    stored: Mapping, current: Mapping, patterns=OPERATIONAL_CONFIG_KEYS
) -> tuple[list[str], list[str]]:
  """(refused, allowed) differences between stored and current metadata, as messages.

  Config fields matching `patterns` are allowed; every other difference is refused.
  """
  refused, allowed = [], []
  for path, was, now in _leaf_diffs(stored, current, ""):
    message = f"{path}: checkpoint {was!r}, now {now!r}"
    config_path = path[len("config.") :] if path.startswith("config.") else None
    if config_path is not None and is_operational(config_path, patterns):
      allowed.append(message)
    else:
      refused.append(message)
  return refused, allowed
