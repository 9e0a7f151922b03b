"""Language-model sampling (prefill + KV-cache decode) and teacher-forced scoring."""

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
from alignjax.lm.scoring import ScoreOutput, score, score_model

__all__ = [
    "DecodeState",
    "SampleOutput",
    "SamplingConfig",
    "ScoreOutput",
    "bucket_length",
    "decode",
    "filter_logits",
    "finish",
    "generate",
    "prefill",
    "sample",
    "sampling_log_probs",
    "score",
    "score_model",
]
