"""Language-model sampling (prefill + KV-cache decode) and teacher-forced scoring."""

from alignjax.lm.sampling import (SampleOutput, SamplingConfig, bucket_length, filter_logits,
                                  generate, sample, sampling_log_probs)
from alignjax.lm.scoring import ScoreOutput, score, score_model

__all__ = [
    "SampleOutput", "SamplingConfig", "ScoreOutput", "bucket_length", "filter_logits",
    "generate", "sample", "sampling_log_probs", "score", "score_model",
]
