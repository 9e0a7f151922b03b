"""Rewards for aligning generative models: `Reward(name, fn, differentiable)`.

`fn(images [B, H, W, C] in [0, 1], prompts) -> float32 [B]`. Differentiable rewards are
pure JAX (jittable, usable under jax.grad); host rewards are numpy and can run in a
`HostRewardPool` while the device samples the next batch. `evaluate_reward` returns
np.float32 [B] for either kind.
"""

from alignjax.rewards.base import RANGE_TOLERANCE, Reward, check_images, check_prompts, evaluate_reward
from alignjax.rewards.classifier import class_log_prob, classifier_log_prob
from alignjax.rewards.clip_rewards import (
    AestheticScorer,
    CLIPScorer,
    aesthetic_reward,
    clip_preference_reward,
    clip_score_reward,
    load_aesthetic_mlp,
)
from alignjax.rewards.host import HostRewardPool
from alignjax.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from alignjax.rewards.statistics import brightness

__all__ = [
    "AestheticScorer",
    "CLIPScorer",
    "RANGE_TOLERANCE",
    "HostRewardPool",
    "Reward",
    "aesthetic_reward",
    "brightness",
    "check_images",
    "check_prompts",
    "class_log_prob",
    "classifier_log_prob",
    "clip_preference_reward",
    "clip_score_reward",
    "evaluate_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "load_aesthetic_mlp",
]
