"""NNX models: the digits UNet and classifier, functional LoRA, and model directory I/O."""

from alignjax.models import classifier, io, lora, unet
from alignjax.models.classifier import ClassifierConfig, DigitsClassifier
from alignjax.models.io import ModelIOError, load_model, save_model
from alignjax.models.lora import init_lora, lora_param_count, merge_lora
from alignjax.models.unet import UNet, UNetConfig

__all__ = [
    "ClassifierConfig", "DigitsClassifier", "ModelIOError", "UNet", "UNetConfig",
    "classifier", "init_lora", "io", "load_model", "lora", "lora_param_count", "merge_lora",
    "save_model", "unet",
]
