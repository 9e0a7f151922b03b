r"""Rollouts: the "sample" of the sample → judge → update loop every online LM method shares.

A batch of G left-padded prompts x_g (tokens, valid [G, P]) is repeated k times so that rows
g k, ..., g k + k − 1 hold prompt g (the group layout of `alignjax.algorithms.policy_gradient`),
and each row draws one response with `alignjax.lm.sampling.sample`:

    y_b ~ π_θ(· | x_⌊b/k⌋),   b = 0 .. G k − 1                                          (eq. 1)

A `Rollout` keeps the prompts as given, the responses (tokens, valid [B, N], valid up to and
including EOS) and the sampler's per-token log-probs. The judges of `alignjax.judges` read the
same four token arrays (prompt_tokens, prompt_valid, tokens, valid).

Scoring a rollout (policy, old policy or reference) runs the teacher-forced scorer on the whole
sequences s_b = [x_b ; y_b] [B, P + N] with

    valid_s = [prompt_valid ; valid],   mask_s = [0 ; valid],                           (eq. 2)
    log π(y_bt | x_b, y_b,<t) = score(s)[b, P + t]     (t = 0 .. N − 1)                   (eq. 3)

(`alignjax.lm.scoring` eq. 1). Positions count real tokens only (`alignjax.models.lm` eq. 1), so
the prompt's left padding and the padding after EOS are both skipped, and eq. 3 equals the
sampler's `model_log_probs` (checked by the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from alignjax.lm import mixture, sampling, scoring

__all__ = [
    "Rollout",
    "mixture_rollout",
    "repeat_groups",
    "response_log_probs",
    "rollout",
    "sequences",
]


@struct.dataclass
class Rollout:
  """Prompts [B, P] (left-padded), responses [B, N], and the sampler's log-probs [B, N]
  (`log_probs` of the sampled distribution, `model_log_probs` untempered; 0 after EOS)."""

  prompt_tokens: jax.Array
  prompt_valid: jax.Array
  tokens: jax.Array
  valid: jax.Array
  log_probs: jax.Array
  model_log_probs: jax.Array

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  def rows(self, index) -> "Rollout":
    """The rollout restricted to rows `index` (a slice or an index array)."""
    return jax.tree.map(lambda x: x[index], self)


def repeat_groups(x, k: int):
  """Each row of x repeated k times, the copies contiguous (eq. 1's layout)."""
  if not isinstance(k, int) or k <= 0:
    raise ValueError(f"repeat_groups: k={k!r} must be a positive int (responses per prompt)")
  return np.repeat(np.asarray(x), k, axis=0)


def rollout(
    graphdef,
    params,
    prompt_tokens,
    prompt_valid,
    key,
    config: sampling.SamplingConfig,
    *,
    num_samples: int = 1,
    **sample_kwargs,
) -> Rollout:
  """k = `num_samples` responses per prompt (eq. 1) from the policy (graphdef, params).

  prompt_tokens, prompt_valid: [G, P] left-padded prompts (host or device arrays).
  sample_kwargs: passed to `alignjax.lm.sampling.sample` (max_prompt_len, min_bucket, mesh).
  Returns a Rollout of B = G k rows.
  """
  tokens = repeat_groups(prompt_tokens, num_samples).astype(np.int32)
  valid = repeat_groups(prompt_valid, num_samples).astype(bool)
  out = sampling.sample(graphdef, params, tokens, valid, key, config, **sample_kwargs)
  return Rollout(
      prompt_tokens=jnp.asarray(tokens),
      prompt_valid=jnp.asarray(valid),
      tokens=out.tokens,
      valid=out.valid,
      log_probs=out.log_probs,
      model_log_probs=out.model_log_probs,
  )


def mixture_rollout(
    models,
    weights,
    prompt_tokens,
    prompt_valid,
    key,
    config: sampling.SamplingConfig,
    *,
    num_samples: int = 1,
    **sample_kwargs,
) -> Rollout:
  """Eq. 1 with responses drawn from the geometric mixture of `models` with `weights`
  (`alignjax.lm.mixture`, e.g. Nash-MD's opponent: (policy, reference), (1 − β, β)).
  `log_probs` are the mixture's (the sampled distribution), `model_log_probs` the first
  model's untempered ones."""
  tokens = repeat_groups(prompt_tokens, num_samples).astype(np.int32)
  valid = repeat_groups(prompt_valid, num_samples).astype(bool)
  out = mixture.sample_mixture(models, weights, tokens, valid, key, config, **sample_kwargs)
  return Rollout(
      prompt_tokens=jnp.asarray(tokens),
      prompt_valid=jnp.asarray(valid),
      tokens=out.tokens,
      valid=out.valid,
      log_probs=out.log_probs,
      model_log_probs=out.model_log_probs[0],
  )


def sequences(r: Rollout) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(tokens, valid, mask) [B, P + N] of the whole sequences (eq. 2), for the scorer."""
  tokens = jnp.concatenate([r.prompt_tokens, r.tokens], axis=1)
  valid = jnp.concatenate([r.prompt_valid, r.valid], axis=1)
  mask = jnp.concatenate([jnp.zeros_like(r.prompt_valid), r.valid], axis=1)
  return tokens, valid, mask


def response_log_probs(
    graphdef, params, r: Rollout, *, seq_chunk: int | None = None, vocab_chunk: int | None = None
) -> jax.Array:
  """log π(y_bt | x_b, y_b,<t) [B, N] under (graphdef, params) (eq. 3), 0 after EOS; pure and
  differentiable in `params` (jit with graphdef and the chunk sizes static)."""
  tokens, valid, mask = sequences(r)
  start = r.prompt_tokens.shape[1]  # the prompt's slots are never scored
  out = scoring.score(
      graphdef,
      params,
      tokens,
      valid,
      mask,
      seq_chunk=seq_chunk,
      vocab_chunk=vocab_chunk,
      start=start,
  )
  return out.log_probs[:, start:]
