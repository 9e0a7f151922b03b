r"""Preference pairs: (prompt, chosen, rejected[, p]) records -> left-padded scoring batches.

A record (JSONL line, HF row, TFDS example) has string fields `prompt` (or a chat `messages`
list), `chosen` and `rejected`, and optionally a probability label `p` = P(chosen > rejected)
in [0, 1] under `label_key` (soft targets for cDPO / SPPO; 1 when absent). With prompt ids x
(eq. 1 of `alignjax.data.encoding`) and response ids y_w, y_l (eq. 2 there, EOS appended
when `append_eos`) a batch row holds the two full sequences, left-padded to L = max_length:

    tokens_w[b] = [pad] * (L - |x| - |y_w|) + x + y_w,    valid_w[b, t] = t >= L - |x| - |y_w|,
    mask_w[b, t] = t >= L - |y_w|                  (the response tokens; the same for _l)  (eq. 1)

which is what `alignjax.lm.scoring.score(graphdef, params, tokens, valid, mask)` takes: the
summed response log-probability log pi(y | x) of each row.

Length. A pair is too long when |x| > max_prompt_length (if given) or
|x| + max(|y_w|, |y_l|) > max_length. `on_too_long`: "error" raises naming file:line, the
length and the maximum; "drop" skips the pair (counted in `num_dropped`); "truncate_left"
keeps the last tokens of the prompt, as many as both limits allow (counted in
`num_truncated`; a response that leaves no room for one prompt token still raises).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from alignjax.data import encoding
from alignjax.data.sources import DataError, Source, open_source

__all__ = ["PreferenceSet", "load_preferences", "read_label"]


@dataclasses.dataclass(frozen=True)
class PreferenceSet:
  """Tokenised preference pairs (a `Batchable` for `BatchIterator`)."""

  prompt_ids: Sequence[Sequence[int]]
  chosen_ids: Sequence[Sequence[int]]
  rejected_ids: Sequence[Sequence[int]]
  labels: np.ndarray  # float32 [N], P(chosen > rejected)
  locations: Sequence[str]
  max_length: int
  pad_id: int
  num_dropped: int = 0
  num_truncated: int = 0

  def __len__(self) -> int:
    return len(self.prompt_ids)

  def _side(self, indices, responses) -> dict[str, np.ndarray]:
    length = self.max_length
    tokens = np.full((len(indices), length), self.pad_id, np.int32)
    valid = np.zeros((len(indices), length), bool)
    mask = np.zeros((len(indices), length), bool)
    for row, i in enumerate(indices):
      prompt, response = self.prompt_ids[i], responses[i]
      n = len(prompt) + len(response)
      tokens[row, length - n :] = list(prompt) + list(response)
      valid[row, length - n :] = True  # eq. 1
      mask[row, length - len(response) :] = True
    return {"tokens": tokens, "valid": valid, "mask": mask}

  def batch(self, indices) -> dict:
    """{"chosen": {tokens, valid, mask} [B, L], "rejected": {...}, "label" [B], "index" [B]}."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    return {
        "chosen": self._side(indices, self.chosen_ids),
        "rejected": self._side(indices, self.rejected_ids),
        "label": self.labels[indices].astype(np.float32),
        "index": indices.astype(np.int32),
    }


def read_label(record: dict, key: str | None, where: str) -> float:
  """record[key] as a probability in [0, 1]; 1.0 when key is None or absent."""
  if key is None or key not in record:
    return 1.0
  value = record[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DataError(f"{where}: field {key!r} must be a number in [0, 1], got {value!r}")
  if not (math.isfinite(value) and 0.0 <= value <= 1.0):
    raise DataError(f"{where}: field {key!r}={value!r} is outside [0, 1]")
  return float(value)


def _too_long(where, what, length, maximum):
  return DataError(
      f"{where}: {what} is {length} tokens, more than the maximum {maximum}; raise the "
      f"maximum or set on_too_long to one of {encoding.ON_TOO_LONG}"
  )


def _fit_pair(prompt, longest, max_length, max_prompt_length, on_too_long, where):
  """(prompt ids or None when dropped, truncated?) under the length rules (module doc)."""
  prompt_limit = max_length if max_prompt_length is None else max_prompt_length
  budget = min(prompt_limit, max_length - longest)
  if len(prompt) <= budget:
    return prompt, False
  if on_too_long == "drop":
    return None, False
  if on_too_long == "truncate_left" and budget >= 1:
    return prompt[len(prompt) - budget :], True
  if len(prompt) > prompt_limit and on_too_long == "error":
    raise _too_long(where, "the prompt", len(prompt), prompt_limit)
  raise _too_long(where, "prompt + longest response", len(prompt) + longest, max_length)


def load_preferences(
    source: str | os.PathLike | Source,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    label_key: str | None = "p_chosen",
    messages_key: str = "messages",
    use_chat_template: bool | None = None,
    append_eos: bool = True,
    on_too_long: str = "error",
) -> PreferenceSet:
  """A PreferenceSet from a JSONL path or a source; every record is checked (module doc)."""
  encoding.check_on_too_long(on_too_long)
  if max_length < 2:
    raise ValueError(f"load_preferences: max_length={max_length} must be >= 2")
  if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
    raise ValueError(
        f"load_preferences: max_prompt_length={max_prompt_length} must be in "
        f"[1, max_length={max_length})"
    )
  if not hasattr(source, "where"):
    source = open_source(source, text_key=prompt_key)
  prompts, chosen, rejected, labels, locations = [], [], [], [], []
  dropped = truncated = 0
  for i in range(len(source)):
    record, where = source[i], source.where(i)
    x = encoding.encode_prompt(
        tokenizer,
        record,
        where,
        key=prompt_key,
        messages_key=messages_key,
        use_chat_template=use_chat_template,
    )
    y_w = encoding.encode_completion(tokenizer, record, chosen_key, where, append_eos=append_eos)
    y_l = encoding.encode_completion(tokenizer, record, rejected_key, where, append_eos=append_eos)
    label = read_label(record, label_key, where)
    x, cut = _fit_pair(
        x, max(len(y_w), len(y_l)), max_length, max_prompt_length, on_too_long, where
    )
    if x is None:
      dropped += 1
      continue
    truncated += cut
    prompts.append(x)
    chosen.append(y_w)
    rejected.append(y_l)
    labels.append(label)
    locations.append(where)
  if not prompts:
    raise DataError(
        f"load_preferences: no pairs left ({len(source)} records, {dropped} dropped as too long)"
    )
  return PreferenceSet(
      prompts,
      chosen,
      rejected,
      np.asarray(labels, np.float32),
      locations,
      max_length,
      encoding.pad_id_of(tokenizer),
      dropped,
      truncated,
  )
