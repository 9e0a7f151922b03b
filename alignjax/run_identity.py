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

Content hashes (`content_hash`) are full sha256s of the bytes. Hashing a Stable Diffusion
base model reads gigabytes, so each file's sha256 is cached, keyed by its real path and

  (1)  key = (size, mtime_ns, ctime_ns, inode)   from os.stat,

in one small JSON file (`default_hash_cache()`: $ALIGNJAX_HASH_CACHE, "" or "off" to
disable; else $XDG_CACHE_HOME/alignjax/content_hashes.json, by default under ~/.cache). A
cached sha256 is used only while all of (1) equal what was recorded; anything else re-hashes.
ctime and inode are in the key because tools that copy or extract files (cp -p, rsync -a,
tar) restore mtime but cannot restore ctime, and an atomic replace gets a new inode. An
entry is stored only when the file did not change while it was hashed and its mtime and
ctime are older than `_RACY_WINDOW_NS` at the start of the hash, so a write in the same
timestamp tick as the hash (git's "racily clean" problem) cannot be mistaken for the hashed
content. The cache is written atomically (a temporary file renamed over it) and merged with
what other processes wrote meanwhile; an unreadable, corrupt or unwritable cache only logs
a warning, and the file is hashed. The cache file itself (and its temporary files) is
skipped when it lies inside a directory being hashed.

We keep full hashes rather than hashing only safetensors headers and file sizes: a header
holds the tensors' names, dtypes, shapes and offsets, not their values, so two fine-tunes of
one architecture have byte-identical headers and sizes; and the full sha256 keeps the hashes
that existing checkpoints recorded valid.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

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


HASH_CACHE_ENV = "ALIGNJAX_HASH_CACHE"
_RACY_WINDOW_NS = 2_000_000_000  # >= every common filesystem's timestamp granularity (FAT: 2 s)
_MAX_CACHE_ENTRIES = 4096
_CACHE_VERSION = 1


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def default_hash_cache() -> str | None:
  """The hash cache file: $ALIGNJAX_HASH_CACHE ("", "0" or "off": None, no cache), else
  $XDG_CACHE_HOME/alignjax/content_hashes.json ($XDG_CACHE_HOME defaults to ~/.cache)."""
  value = os.environ.get(HASH_CACHE_ENV)
  if value is not None:
    return None if value.strip().lower() in ("", "0", "off", "none", "false") else value
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "alignjax", "content_hashes.json")


def _stat_key(st: os.stat_result) -> list[int]:
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # eq. (1)


class _HashCache:
  """Per-file sha256s keyed by real path and eq. (1); see the module docstring."""

  def __init__(self, file: str | None):
    self.file = None if file is None else os.path.abspath(file)
    self.entries = self._read()
    self.new: dict[str, dict] = {}

  def _read(self) -> dict:
    if self.file is None:
      return {}
    try:
      with open(self.file, encoding="utf-8") as f:
        data = json.load(f)
    except FileNotFoundError:
      return {}
    except (OSError, ValueError) as e:
      log.warning("ignoring the content hash cache %s: %s: %s", self.file, type(e).__name__, e)
      return {}
    ok = isinstance(data, dict) and data.get("version") == _CACHE_VERSION
    entries = data.get("entries") if ok else None
    return entries if isinstance(entries, dict) else {}

  def is_own_file(self, path: str) -> bool:
    """Whether `path` is the cache file or one of its temporary files (skipped in hashes)."""
    if self.file is None:
      return False
    real, own = os.path.realpath(path), os.path.realpath(self.file)
    name = os.path.basename(own)
    return real == own or (
        os.path.dirname(real) == os.path.dirname(own)
        and os.path.basename(real).startswith(name + ".")
        and real.endswith(".tmp")
    )

  def sha256(self, path: str) -> str:
    real = os.path.realpath(path)
    key = _stat_key(os.stat(real))
    entry = self.entries.get(real)
    if (
        isinstance(entry, dict)
        and entry.get("stat") == key
        and isinstance(entry.get("sha256"), str)
    ):
      return entry["sha256"]
    started = time.time_ns()
    digest = _file_sha256(real)
    after = os.stat(real)
    settled = started - max(after.st_mtime_ns, after.st_ctime_ns) > _RACY_WINDOW_NS
    if self.file is not None and _stat_key(after) == key and settled:
      self.new[real] = self.entries[real] = {"stat": key, "sha256": digest}
    return digest

  def save(self) -> None:
    """Merges the new entries into the file on disk, atomically; failures only warn."""
    if self.file is None or not self.new:
      return
    entries = self._read()  # what other processes wrote since we read it
    for path, entry in self.new.items():
      entries.pop(path, None)
      entries[path] = entry  # newest last: the oldest are dropped first
    entries = dict(list(entries.items())[-_MAX_CACHE_ENTRIES:])
    directory, tmp = os.path.dirname(self.file), None
    try:
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(
          dir=directory, prefix=os.path.basename(self.file) + ".", suffix=".tmp"
      )
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"version": _CACHE_VERSION, "entries": entries}, f)
      os.replace(tmp, self.file)
      tmp = None
    except OSError as e:
      log.warning(
          "could not write the content hash cache %s (%s: %s); the next start hashes again",
          self.file,
          type(e).__name__,
          e,
      )
    finally:
      if tmp is not None:
        try:
          os.remove(tmp)
        except OSError:
          pass
    self.new = {}


def content_hash(path: str | os.PathLike, *, cache: bool | str | os.PathLike = True) -> str:
  """ "sha256:<hex>" identifying a file or a directory's contents.

  A file: the sha256 of its bytes (what `sha256sum` prints). A directory: the sha256 of
  the lines "<relative path>\\0<file sha256>\\n" over its files in sorted order, so
  renaming, adding, removing or changing any file changes the hash.

  cache: True uses `default_hash_cache()`, a path that cache file, False none. A file's
  sha256 comes from the cache while its eq. (1) key is unchanged (module docstring); the
  result is the same either way.
  """
  path = os.fspath(path)
  if cache is True:
    cache_file = default_hash_cache()
  else:
    cache_file = None if cache is False or cache is None else os.fspath(cache)
  hashes = _HashCache(cache_file)
  try:
    if os.path.isfile(path):
      return "sha256:" + hashes.sha256(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"content_hash: {path} does not exist")
    files = sorted(
        (
            os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/"),
            os.path.join(root, name),
        )
        for root, _, names in os.walk(path)
        for name in names
        if not hashes.is_own_file(os.path.join(root, name))
    )
    digest = hashlib.sha256()
    for rel, full in files:
      digest.update(f"{rel}\0{hashes.sha256(full)}\n".encode())
    return "sha256:" + digest.hexdigest()
  finally:
    hashes.save()


def frozen_model_metadata(
    path: str | os.PathLike, *, cache: bool | str | os.PathLike = True
) -> dict:
  """{"path", "hash"} that identifies a frozen model directory or file in metadata.

  The hash is `content_hash(path, cache=cache)`: cached per file (module docstring), so a
  start or resume re-reads only files whose size, mtime, ctime or inode changed.
  """
  return {"path": os.path.abspath(os.fspath(path)), "hash": content_hash(path, cache=cache)}


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
