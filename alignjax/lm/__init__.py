"""Language-model sampling (prefill + KV-cache decode, also from a geometric mixture of
models), teacher-forced scoring, rollouts."""

from alignjax.lm.sampling import (
    DecodeState,
    SampleOutput,
    SamplingConfig,
    bucket_length,
    decode,
    filter_logits,
    finish,
    generate,
    prefill,
    sample,
    sampling_log_probs,
)
from alignjax.lm import mixture, rollout
from alignjax.lm.mixture import MixtureSampleOutput, generate_mixture, mix_logits, sample_mixture
from alignjax.lm.rollout import Rollout, response_log_probs
from alignjax.lm.scoring import ScoreOutput, score, score_model

__all__ = [
    "DecodeState",
    "MixtureSampleOutput",
    "Rollout",
    "SampleOutput",
    "SamplingConfig",
    "ScoreOutput",
    "bucket_length",
    "decode",
    "filter_logits",
    "finish",
    "generate",
    "generate_mixture",
    "mix_logits",
    "mixture",
    "prefill",
    "response_log_probs",
    "rollout",
    "sample",
    "sample_mixture",
    "sampling_log_probs",
    "score",
    "score_model",
]
