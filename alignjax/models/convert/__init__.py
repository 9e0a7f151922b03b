"""Hugging Face checkpoint loading and export (key tables, strict checks): causal LMs,
sequence-classification reward models, PEFT LoRA adapters."""

from alignjax.models.convert.hf_lm import abstract_lm, load_hf_lm, read_hf_config, save_hf_lm
from alignjax.models.convert.hf_reward import load_hf_reward, save_hf_reward
from alignjax.models.convert.lm_keys import Rule, key_table
from alignjax.models.convert.peft_lora import (
    load_peft_adapter,
    save_merged_hf_lm,
    save_peft_adapter,
)
from alignjax.models.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from alignjax.models.convert.tokenizer import (
    apply_chat_template,
    copy_tokenizer_files,
    encode_batch,
    load_tokenizer,
    pad_left,
)

__all__ = [
    "CheckpointError",
    "Rule",
    "SafetensorsCheckpoint",
    "abstract_lm",
    "apply_chat_template",
    "copy_tokenizer_files",
    "encode_batch",
    "key_table",
    "load_hf_lm",
    "load_hf_reward",
    "load_peft_adapter",
    "load_tokenizer",
    "pad_left",
    "read_hf_config",
    "save_hf_lm",
    "save_hf_reward",
    "save_merged_hf_lm",
    "save_peft_adapter",
]
