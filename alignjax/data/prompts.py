r"""Prompt sets: records -> validated, tokenised prompts -> left-padded batches for the sampler.

`load_prompts` reads a source (a .txt file: one prompt per line, blank lines skipped; a .jsonl
file: a `key` field, or a `messages` list for chat; an HF / TFDS source), encodes each
prompt (eq. 1 of `alignjax.data.encoding`) and checks its length against `max_length`:

    on_too_long = "error":          DataError naming file:line, the length and the maximum
                  "drop":           skipped, counted in `PromptSet.num_dropped`
                  "truncate_left":  ids[-max_length:] (the end of the prompt is kept),
                                    counted in `PromptSet.num_truncated`

A batch of indices is left-padded to the fixed length P = max_length (static shapes):

    tokens[b] = [pad] * (P - n_b) + ids_b,   valid[b, t] = t >= P - n_b                  (eq. 1)

with "index" [B] the rows' positions in the set (look up e.g. a reference answer in
`PromptSet.records[index]`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from alignjax.data import encoding
from alignjax.data.sources import DataError, ListSource, Source, open_source
from alignjax.models.convert.tokenizer import pad_left

__all__ = ["PromptSet", "load_prompts", "prompt_set_from_ids"]


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Tokenised prompts and their source records (a `Batchable` for `BatchIterator`)."""

  ids: Sequence[Sequence[int]]
  records: Sequence[dict]
  locations: Sequence[str]
  max_length: int
  pad_id: int
  num_dropped: int = 0
  num_truncated: int = 0

  def __len__(self) -> int:
    return len(self.ids)

  def batch(self, indices) -> dict[str, np.ndarray]:
    """{"tokens" int32 [B, P], "valid" bool [B, P] (eq. 1), "index" int32 [B]}."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    tokens, valid = pad_left(
        [self.ids[i] for i in indices],
        max_length=self.max_length,
        pad_id=self.pad_id,
        length=self.max_length,
    )
    return {"tokens": tokens, "valid": valid, "index": indices.astype(np.int32)}


def _fit(ids, max_length, on_too_long, where, what):
  """(ids or None when dropped, truncated?) under the on_too_long policy."""
  if len(ids) <= max_length:
    return ids, False
  if on_too_long == "drop":
    return None, False
  if on_too_long == "truncate_left":
    return ids[len(ids) - max_length :], True
  raise DataError(
      f"{where}: {what} is {len(ids)} tokens, more than the maximum {max_length}; raise the "
      f"maximum or set on_too_long to one of {encoding.ON_TOO_LONG}"
  )


def load_prompts(
    source: str | os.PathLike | Source,
    tokenizer,
    *,
    max_length: int,
    key: str = "prompt",
    messages_key: str = "messages",
    use_chat_template: bool | None = None,
    on_too_long: str = "error",
) -> PromptSet:
  """A PromptSet from a file path or source; every record is checked (see module doc)."""
  encoding.check_on_too_long(on_too_long)
  if max_length < 1:
    raise ValueError(f"load_prompts: max_length={max_length} must be >= 1")
  if not hasattr(source, "where"):
    source = open_source(source, text_key=key)
  ids, records, locations = [], [], []
  dropped = truncated = 0
  for i in range(len(source)):
    record, where = source[i], source.where(i)
    prompt = encoding.encode_prompt(
        tokenizer,
        record,
        where,
        key=key,
        messages_key=messages_key,
        use_chat_template=use_chat_template,
    )
    prompt, cut = _fit(prompt, max_length, on_too_long, where, "the prompt")
    if prompt is None:
      dropped += 1
      continue
    truncated += cut
    ids.append(prompt)
    records.append(record)
    locations.append(where)
  if not ids:
    raise DataError(
        f"load_prompts: no prompts left ({len(source)} records, {dropped} dropped as longer "
        f"than max_length={max_length})"
    )
  return PromptSet(
      ids, records, locations, max_length, encoding.pad_id_of(tokenizer), dropped, truncated
  )


def prompt_set_from_ids(
    ids: Sequence[Sequence[int]], *, max_length: int, pad_id: int = 0, records=None
) -> PromptSet:
  """A PromptSet from already-encoded prompts (e.g. the synthetic language's equations)."""
  source = ListSource(
      records if records is not None else [{} for _ in ids],
      [f"ids[{i}]" for i in range(len(ids))],
  )
  for i, seq in enumerate(ids):
    if not 1 <= len(seq) <= max_length:
      raise DataError(
          f"{source.where(i)}: prompt is {len(seq)} tokens; it must have 1 .. "
          f"max_length={max_length}"
      )
  return PromptSet(
      [list(map(int, s)) for s in ids], source.records, source.locations, max_length, pad_id
  )
