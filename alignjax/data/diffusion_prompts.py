"""Text-to-image prompt sets (DDPO's, shipped with alignjax), prompt files, templates, sampling,
and DDPO's per-prompt reward normalisation.

Shipped sets, `alignjax/data/prompt_sets/<name>.txt`, one prompt per line:

    simple_animals    45 common animals (DDPO's `simple_animals` asset: its aesthetic and
                      JPEG-compressibility experiments)
    imagenet_animals  the 398 animal classes of ImageNet-1k (class ids 0-397, DDPO's
                      `imagenet_animals` = imagenet_classes[0:398]), in class-id order, each
                      named by its first WordNet lemma ("tench", "goldfish", ...)

DDPO feeds the bare names as prompts; a template turns each subject s into a sentence, and a
batch draws prompts uniformly with replacement (DDPO's `random.choice` per sample):

    (1)  prompt = template.format(s),   e.g. "a photo of a {}" -> "a photo of a cat"
    (2)  i_b ~ Uniform{0, ..., N - 1} independently,   prompt_b = P[i_b]   (b = 1..B)

Per-prompt advantages (DDPO section 5, "per-prompt stat tracking") are
`alignjax.algorithms.ddpo.PerPromptStatTracker`, re-exported here (not duplicated): with
m_c, s_c the mean and (population) standard deviation of the last `buffer_size` rewards of
prompt c, current batch included,

    (3)  A_i = (r_i - m_c) / (s_c + 1e-6)   once prompt c = c_i has >= min_count rewards,
         A_i = (r_i - mean(r)) / (std(r) + 1e-6) over the whole batch r before that;

`state_dict()` / `from_state_dict()` give a JSON-serialisable dict for checkpoints.

`load_prompt_file` reads user prompts: a `.txt` file (one prompt per line; blank lines
skipped, surrounding whitespace stripped, as DDPO does) or `.jsonl` / `.json` (JSON Lines, one
object per line with a string field "prompt"). Errors are `DataError`s naming file:line.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import re
import string
from typing import Iterable, Sequence

import numpy as np

from alignjax.algorithms.ddpo import PerPromptStatTracker
from alignjax.data.sources import DataError

__all__ = [
    "PerPromptStatTracker",
    "available_prompt_sets",
    "format_prompts",
    "load_prompt_file",
    "prompt_set",
    "sample_prompts",
]

PROMPT_SETS_DIR = "prompt_sets"
TEXT_EXTENSIONS = (".txt",)
JSONL_EXTENSIONS = (".jsonl", ".json")


def _text_prompts(lines: Iterable[tuple[int, str]], where: str) -> list[str]:
  prompts = [line.strip() for _, line in lines if line.strip()]
  if not prompts:
    raise DataError(f"{where}: no prompts (the file is empty or has only blank lines)")
  return prompts


def _decoded_lines(path: str) -> list[tuple[int, str]]:
  """(1-based line number, text) of a UTF-8 file; a DataError names a line that is not UTF-8."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e
  lines = []
  for number, line in enumerate(raw.splitlines(), start=1):
    try:
      lines.append((number, line.decode("utf-8-sig" if number == 1 else "utf-8")))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  return lines


def _jsonl_prompts(lines: Iterable[tuple[int, str]], path: str, key: str) -> list[str]:
  prompts = []
  for number, line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
      found = "no such field" if key not in record else f"got {value!r}"
      raise DataError(
          f"{path}:{number}: field {key!r} must be a non-empty string ({found}; fields: "
          f"{sorted(record)})"
      )
    prompts.append(value)
  if not prompts:
    raise DataError(f"{path}: no prompts (the file is empty or has only blank lines)")
  return prompts


def load_prompt_file(path: str | os.PathLike, *, key: str = "prompt") -> list[str]:
  """Prompts of a .txt file (one per line) or a .jsonl / .json file (field `key` per line)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in TEXT_EXTENSIONS + JSONL_EXTENSIONS:
    raise DataError(
        f"{path}: unknown prompt file extension {ext!r}; valid: {TEXT_EXTENSIONS + JSONL_EXTENSIONS}"
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such prompt file")
  lines = _decoded_lines(path)
  if ext in TEXT_EXTENSIONS:
    return _text_prompts(lines, path)
  return _jsonl_prompts(lines, path, key)


def _sets_dir():
  return importlib.resources.files(__package__).joinpath(PROMPT_SETS_DIR)


def available_prompt_sets() -> list[str]:
  """Names of the shipped prompt sets, sorted."""
  return sorted(
      entry.name[: -len(".txt")] for entry in _sets_dir().iterdir() if entry.name.endswith(".txt")
  )


@functools.lru_cache(maxsize=None)
def _read_set(name: str) -> tuple[str, ...]:
  resource = _sets_dir().joinpath(f"{name}.txt")
  text = resource.read_text(encoding="utf-8")
  where = f"alignjax/data/{PROMPT_SETS_DIR}/{name}.txt"
  return tuple(_text_prompts(enumerate(text.splitlines(), start=1), where))


def prompt_set(name: str) -> list[str]:
  """The shipped prompt set `name` (see the module docstring), as a new list."""
  names = available_prompt_sets()
  if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name) or name not in names:
    raise ValueError(f"unknown prompt set {name!r}; shipped sets: {names}")
  return list(_read_set(name))


def format_prompts(subjects: Sequence[str], template: str = "{}") -> list[str]:
  """Eq. 1 for each subject; `template` holds exactly one "{}" (literal braces as "{{ }}")."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f"template {template!r}: not a format string ({e})") from None
  if fields != [""]:
    raise ValueError(
        f"template {template!r}: must contain exactly one empty placeholder '{{}}' "
        f"(e.g. 'a photo of a {{}}'); found fields {fields}"
    )
  if isinstance(subjects, str):
    raise ValueError("format_prompts: subjects must be a sequence of strings, not one str")
  return [template.format(s) for s in subjects]


def sample_prompts(prompts: Sequence[str], batch_size: int, rng: np.random.Generator) -> list[str]:
  """Eq. 2: `batch_size` prompts drawn uniformly with replacement, indices
  rng.integers(0, N, batch_size)."""
  if not len(prompts):
    raise ValueError("sample_prompts: no prompts to sample from")
  if (
      isinstance(batch_size, bool)
      or not isinstance(batch_size, (int, np.integer))
      or batch_size < 1
  ):
    raise ValueError(f"sample_prompts: batch_size={batch_size!r} must be a positive integer")
  if not isinstance(rng, np.random.Generator):
    raise TypeError(
        f"sample_prompts: rng must be a numpy Generator (np.random.default_rng(seed)); got "
        f"{type(rng).__name__}"
    )
  return [prompts[i] for i in rng.integers(0, len(prompts), int(batch_size))]
