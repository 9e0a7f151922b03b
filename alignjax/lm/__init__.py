"""Language-model sampling (prefill + KV-cache decode), teacher-forced scoring, rollouts."""

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
from alignjax.lm import rollout
from alignjax.lm.rollout import Rollout, response_log_probs
from alignjax.lm.scoring import ScoreOutput, score, score_model

__all__ = [
    "DecodeState",
    "Rollout",
    "SampleOutput",
    "SamplingConfig",
    "ScoreOutput",
    "bucket_length",
    "decode",
    "filter_logits",
    "finish",
    "generate",
    "prefill",
    "response_log_probs",
    "rollout",
    "sample",
    "sampling_log_probs",
    "score",
    "score_model",
]
