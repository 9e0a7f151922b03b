"""NNX models: the digits UNet and classifier, decoder LMs, toy flows, functional LoRA, I/O."""

from alignjax.models import classifier, io, lm, lora, toy, unet
from alignjax.models.classifier import ClassifierConfig, DigitsClassifier
from alignjax.models.io import ModelIOError, load_model, save_model
from alignjax.models.lm import (
    KVCache,
    LMConfig,
    TransformerLM,
    extend_cache,
    init_cache,
    lm_config_from_hf,
    lm_sharding_rules,
    positions_from_mask,
)
from alignjax.models.lora import init_lora, lora_param_count, merge_lora
from alignjax.models.unet import UNet, UNetConfig

__all__ = [
    "KVCache",
    "LMConfig",
    "TransformerLM",
    "extend_cache",
    "init_cache",
    "lm",
    "lm_config_from_hf",
    "lm_sharding_rules",
    "positions_from_mask",
    "toy",
    "ClassifierConfig",
    "DigitsClassifier",
    "ModelIOError",
    "UNet",
    "UNetConfig",
    "classifier",
    "init_lora",
    "io",
    "load_model",
    "lora",
    "lora_param_count",
    "merge_lora",
    "save_model",
    "unet",
]
