"""NNX models: the digits UNet and classifier, decoder LMs, reward and preference heads, toy
flows, functional LoRA, I/O."""

from alignjax.models import classifier, heads, io, lm, lora, toy, unet
from alignjax.models.classifier import ClassifierConfig, DigitsClassifier
from alignjax.models.heads import (
    GeneralPreferenceModel,
    PairwisePreferenceModel,
    RewardModel,
    preference_logit,
    reward_forward,
)
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
from alignjax.models.lora import (
    dense_num_in,
    init_lm_lora,
    init_lora,
    lm_lora_plan,
    lora_param_count,
    merge_lora,
)
from alignjax.models.unet import UNet, UNetConfig

__all__ = [
    "GeneralPreferenceModel",
    "PairwisePreferenceModel",
    "RewardModel",
    "dense_num_in",
    "heads",
    "init_lm_lora",
    "lm_lora_plan",
    "preference_logit",
    "reward_forward",
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
