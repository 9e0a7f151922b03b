"""Data: embedded sets (digits, synthetic language); prompt and preference sets for LMs.

Prompts and preference pairs load from JSONL / text files, Hugging Face datasets saved to disk
and local TFDS datasets (`sources`), tokenise with a transformers tokenizer or the synthetic
language (`encoding`), and batch through a deterministic, resumable, multi-host
`BatchIterator`.
"""

from alignjax.data.digits import load_digits_split, to_images, from_images
from alignjax.data.encoding import ON_TOO_LONG, SyntheticTokenizer
from alignjax.data.iterator import BatchIterator
from alignjax.data.preferences import PreferenceSet, load_preferences
from alignjax.data.prompts import PromptSet, load_prompts, prompt_set_from_ids
from alignjax.data.sources import (
    DataError,
    HFDiskSource,
    ListSource,
    TFDSSource,
    open_source,
    read_jsonl,
    read_text,
)

__all__ = [
    "load_digits_split",
    "to_images",
    "from_images",
    "BatchIterator",
    "DataError",
    "HFDiskSource",
    "ListSource",
    "ON_TOO_LONG",
    "PreferenceSet",
    "PromptSet",
    "SyntheticTokenizer",
    "TFDSSource",
    "load_preferences",
    "load_prompts",
    "open_source",
    "prompt_set_from_ids",
    "read_jsonl",
    "read_text",
]
