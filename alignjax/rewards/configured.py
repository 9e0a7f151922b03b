"""The reward a diffusion script names in its config, with its weights as an argument.

    r = reward.fn(reward.params, images, cond)      images [B, H, W, C] in [0, 1] → [B]     (1)

`cond` is the backend's condition (`alignjax.diffusion.backend`): the class ids for the digits
model; for Stable Diffusion a dict whose "reward_ids" leaf holds the prompts tokenised for the
reward's own CLIP tokenizer (`ParamReward.extra_inputs(texts)` makes that leaf on the host). A
jitted step takes `reward.params` as an argument, so hundreds of MB of CLIP weights never
become constants of the program and new weights never recompile (DRaFT and Adjoint Matching
differentiate (1) in the images). Host rewards (JPEG sizes) ignore `params` and `cond`.

Rewards by family (`REWARDS`):
    digits            classifier (log p(target | image) of the embedded digits classifier),
                      brightness, jpeg_compressibility, jpeg_incompressibility
    stable_diffusion  aesthetic (LAION predictor on CLIP ViT-L/14), clip_score,
                      clip_preference (PickScore / HPS-style), brightness, jpeg_*
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np
from flax import nnx

from alignjax.rewards import clip_rewards, jpeg, statistics
from alignjax.rewards.base import Reward
from alignjax.rewards.classifier import classifier_log_prob

HOST_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility")
REWARDS = {
    "digits": ("classifier", "brightness") + HOST_REWARDS,
    "stable_diffusion": ("aesthetic", "clip_score", "clip_preference", "brightness") + HOST_REWARDS,
}
DIFFERENTIABLE = ("classifier", "brightness", "aesthetic", "clip_score", "clip_preference")
REWARD_IDS = "reward_ids"


class RewardConfigError(ValueError):
  """A reward config names an unknown reward, or a model file that is missing or wrong."""


@dataclasses.dataclass(frozen=True)
class ParamReward:
  """Eq. 1: a named reward with its weights `params` as an argument of `fn`.

  extra_inputs(texts) -> {REWARD_IDS: int [B, T]} adds the reward's token ids to the raw
  condition (None: the reward reads no prompt text).
  """

  name: str
  fn: Callable[[Any, Any, Any], Any]
  params: Any
  differentiable: bool
  extra_inputs: Callable[[list[str]], dict] | None = None

  def bind(self, params=None) -> Reward:
    """The `Reward` (images, cond) -> [B] with `params` (default `self.params`) bound."""
    params = self.params if params is None else params
    if not self.differentiable:
      return Reward(self.name, lambda images, cond: self.fn(None, images, None), False)
    return Reward(self.name, lambda images, cond: self.fn(params, images, cond), True)


def _check_path(path, key: str, what: str) -> str:
  if not path:
    raise RewardConfigError(f"config.{key} is empty: give the path of {what}")
  path = os.fspath(path)
  if not os.path.exists(path):
    raise RewardConfigError(f"config.{key}={path!r}: no such file or directory ({what})")
  return path


def _jpeg(cfg) -> ParamReward:
  build = {
      "jpeg_compressibility": jpeg.jpeg_compressibility,
      "jpeg_incompressibility": jpeg.jpeg_incompressibility,
  }[cfg.name]
  reward = build(quality=cfg.jpeg_quality, upscale=cfg.jpeg_upscale)
  return ParamReward(cfg.name, lambda params, images, cond: reward.fn(images, None), None, False)


def digits_classifier_reward(classifier: nnx.Module, target: int | None) -> ParamReward:
  """log p(y | image) of the digits classifier, y = `target` or each image's class id."""
  graphdef, params = nnx.split(classifier)
  num_classes = classifier.config.num_classes

  def fn(params, images, cond):
    reward = classifier_log_prob(
        lambda x: nnx.merge(graphdef, params)(x), target=target, num_classes=num_classes
    )
    return reward.fn(images, cond)

  name = "classifier_log_prob" if target is None else f"classifier_log_prob_{target}"
  return ParamReward(name, fn, params, True)


def _clip_reward(cfg) -> ParamReward:
  """aesthetic / clip_score / clip_preference from config.reward.model_dir (a transformers
  CLIPModel directory with its tokenizer) and, for aesthetic, config.reward.mlp_path."""
  from alignjax.models.convert.clip_keys import load_clip_tokenizer
  from alignjax.models.convert.clip_model import load_clip_model

  directory = _check_path(cfg.get("model_dir"), "reward.model_dir", "a CLIP model directory")
  try:
    model, _ = load_clip_model(directory)
  except (ValueError, OSError, KeyError) as e:
    raise RewardConfigError(
        f"config.reward.model_dir={directory!r}: not a CLIP model directory ({e})"
    ) from e
  if cfg.name == "aesthetic":
    mlp = _check_path(cfg.get("mlp_path"), "reward.mlp_path", "the aesthetic MLP's weights")
    scorer = clip_rewards.AestheticScorer(model, mlp)
    return ParamReward(
        "aesthetic", lambda p, images, cond: scorer.score(p, images), scorer.params, True
    )
  kind = "preference" if cfg.name == "clip_preference" else "clip_score"
  scorer = clip_rewards.CLIPScorer(
      model,
      load_clip_tokenizer(directory),
      kind=kind,
      name=cfg.name,
      clip_at_zero=bool(cfg.get("clip_at_zero", True)),
  )
  extra = lambda texts: {REWARD_IDS: np.asarray(scorer.tokenize(texts), np.int32)}
  fn = lambda p, images, cond: scorer.score(p, images, cond[REWARD_IDS])
  return ParamReward(cfg.name, fn, scorer.params, True, extra_inputs=extra)


def make_reward(cfg, family: str, *, classifier: nnx.Module | None = None) -> ParamReward:
  """The ParamReward named by `cfg.name` for a backend `family` (see REWARDS)."""
  valid = REWARDS.get(family)
  if valid is None:
    raise RewardConfigError(f"model family {family!r}: valid choices are {sorted(REWARDS)}")
  if cfg.name not in valid:
    raise RewardConfigError(
        f"config.reward.name={cfg.name!r} is not a reward of the {family} model; valid choices "
        f"are {', '.join(valid)}"
    )
  if cfg.name in HOST_REWARDS:
    return _jpeg(cfg)
  if cfg.name == "brightness":
    reward = statistics.brightness()
    return ParamReward("brightness", lambda p, images, cond: reward.fn(images, None), {}, True)
  if cfg.name == "classifier":
    if classifier is None:
      raise RewardConfigError("the classifier reward needs the digits classifier")
    target = int(cfg.target)
    return digits_classifier_reward(classifier, None if target < 0 else target)
  return _clip_reward(cfg)
