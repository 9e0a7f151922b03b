"""Record fields -> token ids, for a transformers tokenizer or the synthetic language.

Both tokenizers are used through the same small surface (the transformers one): `encode(text,
add_special_tokens=...)`, `decode(ids)`, `pad_token_id`, `eos_token_id`, `chat_template`.
`SyntheticTokenizer` gives the embedded character tokenizer
(`alignjax.data.synthetic_language`) that surface, so scripts can pass either.

A prompt is encoded as

    ids = tokenizer.encode(prompt)                          (plain text; BOS as the tokenizer adds)
    ids = encode(chat_template(messages, generation prompt)) (chat; special tokens from the
                                                              template only)                (eq. 1)

and a completion (chosen / rejected response) as its text without special tokens, followed
by EOS when `append_eos`:

    ids = tokenizer.encode(completion, add_special_tokens=False) + [eos]               (eq. 2)

so prompt ids + completion ids is the sequence the policy would have sampled.
"""

from __future__ import annotations

from typing import Any, Sequence

from alignjax.data import synthetic_language as sl
from alignjax.data.sources import DataError

__all__ = [
    "ON_TOO_LONG",
    "SyntheticTokenizer",
    "check_on_too_long",
    "encode_completion",
    "encode_prompt",
    "get_string",
    "pad_id_of",
]

ON_TOO_LONG = ("error", "drop", "truncate_left")


class SyntheticTokenizer:
  """The synthetic language's character tokenizer with the transformers tokenizer surface."""

  pad_token_id = sl.PAD_ID
  bos_token_id = sl.BOS_ID
  eos_token_id = sl.EOS_ID
  vocab_size = sl.VOCAB_SIZE
  chat_template = None
  name_or_path = "synthetic_language"

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Character ids, <bos> first when add_special_tokens (ValueError on other characters)."""
    return sl.encode(text, bos=add_special_tokens)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text up to the first <eos> (special tokens are always dropped)."""
    del skip_special_tokens
    return sl.decode(ids)


def pad_id_of(tokenizer) -> int:
  """The pad id (EOS when the tokenizer has no pad token, else 0)."""
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  return 0


def check_on_too_long(on_too_long: str) -> None:
  if on_too_long not in ON_TOO_LONG:
    raise ValueError(f"on_too_long={on_too_long!r}; valid choices are {ON_TOO_LONG}")


def get_string(record: dict, key: str, where: str, *, allow_empty: bool = True) -> str:
  """record[key] as a str, or DataError naming where and the key."""
  if key not in record:
    raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(record)})")
  value = record[key]
  if not isinstance(value, str):
    raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise DataError(f"{where}: field {key!r} is empty")
  return value


def _messages(record: dict, key: str, where: str) -> list[dict]:
  value = record[key]
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: field {key!r} must be a non-empty list of {{role, content}}")
  for i, message in enumerate(value):
    if not isinstance(message, dict):
      raise DataError(f"{where}: {key}[{i}] must be an object, got {type(message).__name__}")
    for field in ("role", "content"):
      get_string(message, field, f"{where}: {key}[{i}]")
  return value


def _template_ids(tokenizer, messages: list[dict], where: str) -> list[int]:
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(
        f"{where}: needs a chat template but tokenizer "
        f"{getattr(tokenizer, 'name_or_path', '')!r} has none; give a plain-text prompt "
        "and use_chat_template=False"
    )
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_text(tokenizer, text: str, where: str, key: str, **kwargs) -> list[int]:
  try:
    return [int(i) for i in tokenizer.encode(text, **kwargs)]
  except ValueError as e:  # e.g. characters outside the synthetic language
    raise DataError(f"{where}: field {key!r}: {e}") from None


def encode_prompt(
    tokenizer,
    record: dict,
    where: str,
    *,
    key: str = "prompt",
    messages_key: str = "messages",
    use_chat_template: bool | None = None,
) -> list[int]:
  """Prompt ids of a record (eq. 1).

  use_chat_template: True: template `messages` (or the prompt as one user turn); False:
  plain `key` text; None: template `messages` when the record has them, else plain text.
  """
  has_messages = messages_key in record
  if use_chat_template is None:
    use_chat_template = has_messages
  if use_chat_template:
    if has_messages:
      messages = _messages(record, messages_key, where)
    else:
      messages = [{"role": "user", "content": get_string(record, key, where)}]
    ids = _template_ids(tokenizer, messages, where)
  else:
    ids = _encode_text(tokenizer, get_string(record, key, where), where, key)
  if not ids:
    raise DataError(f"{where}: prompt {key!r} encodes to no tokens")
  return ids


def encode_completion(
    tokenizer, record: dict, key: str, where: str, *, append_eos: bool = True
) -> list[int]:
  """Completion ids of record[key] (eq. 2); empty completions raise DataError."""
  text = get_string(record, key, where, allow_empty=False)
  ids = _encode_text(tokenizer, text, where, key, add_special_tokens=False)
  if append_eos:
    eos: Any = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
      raise ValueError("append_eos=True but the tokenizer has no eos_token_id")
    ids.append(int(eos))
  return ids
