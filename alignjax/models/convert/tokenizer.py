"""Tokenizers of HF checkpoint directories, chat templates, and left-padded batches.

The tokenizer is transformers' `AutoTokenizer` (a fast tokenizer backed by the `tokenizers`
package) loaded from the same local directory as the weights; transformers is imported only
when a tokenizer is loaded. Batches are left-padded, the layout `TransformerLM` expects:

    tokens[b] = [pad] * (L - n_b) + ids_b,   valid[b, t] = t >= L - n_b               (eq. 1)
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

import numpy as np

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def load_tokenizer(directory: str):
  """transformers tokenizer from a local checkpoint directory (never downloads)."""
  present = [f for f in TOKENIZER_FILES[:6] if os.path.exists(os.path.join(directory, f))]
  if not present:
    raise FileNotFoundError(
        f"{directory}: no tokenizer files (expected one of " f"{list(TOKENIZER_FILES[:6])})"
    )
  try:
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "load_tokenizer needs the `transformers` and `tokenizers` packages "
        "(pip install transformers tokenizers)"
    ) from e
  return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def apply_chat_template(
    tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True
) -> list[int]:
  """Token ids of a conversation [{"role", "content"}, ...] under the tokenizer's template."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
        "template; encode plain text with tokenizer.encode instead"
    )
  text = tokenizer.apply_chat_template(
      list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
  )
  return list(tokenizer.encode(text, add_special_tokens=False))


def pad_left(
    sequences: Sequence[Sequence[int]],
    *,
    max_length: int,
    pad_id: int = 0,
    length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token id lists (eq. 1) -> (tokens int32 [B, L], valid bool [B, L]).

  L is `length` if given, else the longest sequence. A sequence longer than `max_length`
  (e.g. the model's max_position_embeddings minus the tokens to generate) is refused.
  """
  too_long = [(i, len(s)) for i, s in enumerate(sequences) if len(s) > max_length]
  if too_long:
    raise ValueError(
        f"pad_left: sequence(s) (index, length) {too_long[:5]} exceed the "
        f"maximum prompt length {max_length}"
    )
  longest = max((len(s) for s in sequences), default=0)
  length = longest if length is None else length
  if length < longest:
    raise ValueError(f"pad_left: length={length} is shorter than the longest sequence {longest}")
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  valid = np.zeros((len(sequences), length), bool)
  for i, s in enumerate(sequences):
    if len(s):
      tokens[i, length - len(s) :] = s
      valid[i, length - len(s) :] = True
  return tokens, valid


def encode_batch(
    tokenizer, texts: Sequence[str], *, max_length: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (tokens, valid) for plain-text prompts (special tokens as the tokenizer adds)."""
  pad = tokenizer.pad_token_id
  pad = tokenizer.eos_token_id if pad is None else pad
  ids = [tokenizer.encode(t) for t in texts]
  return pad_left(ids, max_length=max_length, pad_id=0 if pad is None else pad, length=length)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
  """Copy the tokenizer files present in `src` to `dst` (e.g. next to exported weights)."""
  os.makedirs(dst, exist_ok=True)
  copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
  for f in copied:
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
  return copied
