r"""Reward and preference models on a `TransformerLM` backbone (its `lm_head` is not used).

Sequences are token batches [B, L] with a `valid` mask; the backbone counts positions over
real tokens only (`alignjax.models.lm` eq. 1), so a mask with holes computes the same as the
packed, left-padded sequence. A sequence is read at its last real token

    t_b = max {t : valid_bt}     (left padding: t_b = L - 1)                            (eq. 1)

(a row with no real token reads position L - 1; callers keep one real token per row).

Bradley–Terry reward model (`RewardModel`): a scalar head w [H, 1] (HF `score.weight`
[1, H]) on the final-norm hidden state h at t_b of the packed sequence [x, y]:

    r(x, y) = h_{t_b}([x, y]) · w                                                     (eq. 2)
    P(y ≻ y' | x) = σ(r(x, y) − r(x, y'))                                             (eq. 3)

Pairwise preference model (`PairwisePreferenceModel`, Nash-LHF style, Munos et al. 2023):
one sequence holds both responses, separated by a SEP token,

    f(x, y, y') = h_{t_b}([x, y, SEP, y']) · w                                        (eq. 4)
    d(x, y, y') = f(x, y, y') − f(x, y', y),   P(y ≻ y' | x) = σ(d)                   (eq. 5)

General preference model (`GeneralPreferenceModel`, GPM, Zhang et al. 2024, "Beyond
Bradley-Terry Models: A General Preference Model for Language Model Alignment"): each
response is embedded once, v(x, y) = h_{t_b}([x, y]) · W ∈ R^{2k}, and

    d(x, y, y') = v_y^T R v_{y'},   R = diag(J, ..., J),   J = [[0, 1], [−1, 0]]
                = Σ_i (v_{y,2i} v_{y',2i+1} − v_{y,2i+1} v_{y',2i})                     (eq. 6)

R is skew-symmetric, so d is antisymmetric and can express cyclic preferences (k = 1 and
v_y on a circle give d = |v|² sin(θ_{y'} − θ_y)); it costs one forward pass per response.

Every model's `logit(x, x_valid, a, a_valid, b, b_valid)` is the antisymmetric logit d(x, a,
b) (eq. 3: d = r(x, a) − r(x, b)), and antisymmetry holds exactly in floating point, by
construction: each pair is put in a canonical order (the lexicographically smaller response,
padding masked out, first), the batch is computed in that order, and the sign follows the
swap,

    d(x, a, b) = s · d_c(x, first, second),   s = −1 if swapped else 1,
    d(x, a, a) = 0                                                                     (eq. 7)

so swapping a and b feeds the network the identical batch and exactly negates d. The
probability is then taken as

    P = σ(|d|) if d ≥ 0 else 1 − σ(|d|)                                               (eq. 8)

for which P(a ≻ b) + P(b ≻ a) = 1 exactly (1 − p is exact for p ∈ [½, 1]) and P(a ≻ a) = ½.

Pure forms over split state (`nnx.split(model)`), jittable: `reward_forward` (eq. 2) and
`preference_logit` (any model's eq. 3/5/6 logit). `head_sharding_rules` shard the backbone like
`TransformerLM` and replicate the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax import parallel
from alignjax.models.lm import TransformerLM, lm_sharding_rules
from alignjax.models.lm_config import LMConfig
from alignjax.models.lm_layers import normal_init

__all__ = [
    "GeneralPreferenceModel",
    "PairwisePreferenceModel",
    "RewardModel",
    "canonical_order",
    "concat_segments",
    "head_sharding_rules",
    "last_token_index",
    "pack_left",
    "pool_last",
    "preference_logit",
    "reward_forward",
    "win_probability",
]


# --------------------------------------------------------------------------- sequence helpers


def last_token_index(valid) -> jax.Array:
  """Index of the last real token of each row (eq. 1): [B, L] bool -> [B] int32."""
  valid = jnp.asarray(valid, bool)
  length = valid.shape[-1]
  return (length - 1 - jnp.argmax(valid[..., ::-1], axis=-1)).astype(jnp.int32)


def pool_last(hidden, valid) -> jax.Array:
  """Hidden states [B, L, H] read at the last real token (eq. 1) -> [B, H]."""
  idx = last_token_index(valid)
  return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def pack_left(tokens, valid, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Moves the real tokens of each row to the right end, in order (left padding)."""
  valid = jnp.asarray(valid, bool)
  order = jnp.argsort(valid.astype(jnp.int32), axis=-1, stable=True)  # pads first, then tokens
  tokens = jnp.take_along_axis(jnp.asarray(tokens), order, axis=-1)
  valid = jnp.take_along_axis(valid, order, axis=-1)
  return jnp.where(valid, tokens, pad_id).astype(jnp.int32), valid


def concat_segments(*segments, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """(tokens, valid) segments [B, L_i] joined along the length and packed (`pack_left`)."""
  tokens = jnp.concatenate([jnp.asarray(t, jnp.int32) for t, _ in segments], axis=1)
  valid = jnp.concatenate([jnp.asarray(v, bool) for _, v in segments], axis=1)
  return pack_left(tokens, valid, pad_id)


def canonical_order(a_tokens, a_valid, b_tokens, b_valid) -> tuple[jax.Array, jax.Array]:
  """(swap, equal) [B] bool for eq. 7: `swap` when b sorts before a (tokens compared
  lexicographically, padding as -1), `equal` when the two responses are the same."""
  if a_tokens.shape != b_tokens.shape:
    raise ValueError(
        f"canonical_order: responses must have the same shape, got {a_tokens.shape} and "
        f"{b_tokens.shape} (pad the shorter one)"
    )
  ka = jnp.where(a_valid, a_tokens, -1)
  kb = jnp.where(b_valid, b_tokens, -1)
  differ = ka != kb
  first = jnp.argmax(differ, axis=-1)[:, None]
  swap = jnp.take_along_axis(kb, first, 1)[:, 0] < jnp.take_along_axis(ka, first, 1)[:, 0]
  equal = ~jnp.any(differ, axis=-1)
  return swap & ~equal, equal


def win_probability(logit) -> jax.Array:
  """P = σ(d) in the exactly complementary form of eq. 8 (float32 at least)."""
  d = jnp.asarray(logit)
  d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
  p = jax.nn.sigmoid(jnp.abs(d))
  return jnp.where(d >= 0, p, 1 - p)


def _ordered_logit(pair_fn, a_tokens, a_valid, b_tokens, b_valid):
  """Eq. 7: `pair_fn(first, first_valid, second, second_valid) -> d_c` on canonical pairs."""
  swap, equal = canonical_order(a_tokens, a_valid, b_tokens, b_valid)
  s = swap[:, None]
  first = jnp.where(s, b_tokens, a_tokens), jnp.where(s, b_valid, a_valid)
  second = jnp.where(s, a_tokens, b_tokens), jnp.where(s, a_valid, b_valid)
  d = pair_fn(*first, *second)
  return jnp.where(equal, jnp.zeros_like(d), jnp.where(swap, -d, d))


# --------------------------------------------------------------------------- models


class _Backbone(nnx.Module):
  """A `TransformerLM` without its output matrix, read at the last real token (eq. 1)."""

  def __init__(self, config: LMConfig, out: int, *, rngs: nnx.Rngs):
    if out < 1:
      raise ValueError(f"{type(self).__name__}: head size must be >= 1, got {out}")
    self.config = config
    self.backbone = TransformerLM(config, rngs=rngs)
    self.backbone.lm_head = None  # never used by a head; not a parameter
    stddev = config.hidden_size**-0.5
    self.score = _Head(config.hidden_size, out, jnp.dtype(config.dtype), rngs, stddev)

  def features(self, tokens, valid=None) -> jax.Array:
    """Head outputs [B, out] float32 at the last real token of each row."""
    tokens = jnp.asarray(tokens)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    hidden, _ = self.backbone.hidden_states(tokens, None, valid)
    return self.score(pool_last(hidden, valid))


class _Head(nnx.Module):

  def __init__(self, size: int, out: int, dtype, rngs: nnx.Rngs, stddev: float):
    self.kernel = nnx.Param(normal_init(rngs.params(), (size, out), dtype, stddev))

  def __call__(self, h):
    return jnp.einsum("bh,ho->bo", h, self.kernel[...], preferred_element_type=jnp.float32)


class RewardModel(_Backbone):
  """Scalar reward r(x, y) (eq. 2) of a packed, left-padded sequence [x, y]."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    super().__init__(config, 1, rngs=rngs)

  def __call__(self, tokens, valid=None) -> jax.Array:
    """Rewards [B] float32 of whole sequences (read at the last real token)."""
    return self.features(tokens, valid)[:, 0]

  def reward(self, prompt_tokens, prompt_valid, tokens, valid) -> jax.Array:
    """r(x, y) [B] for prompts [B, P] and responses [B, N] (eq. 2)."""
    return self(*concat_segments((prompt_tokens, prompt_valid), (tokens, valid)))

  def logit(self, prompt_tokens, prompt_valid, a_tokens, a_valid, b_tokens, b_valid):
    """d = r(x, a) − r(x, b) [B] (eq. 3, exactly antisymmetric by eq. 7)."""
    x = (prompt_tokens, prompt_valid)

    def pair(t1, v1, t2, v2):
      both = jnp.concatenate([t1, t2]), jnp.concatenate([v1, v2])
      r = self.reward(*(jnp.concatenate([u, u]) for u in x), *both)
      return r[: len(t1)] - r[len(t1) :]

    return _ordered_logit(pair, a_tokens, a_valid, b_tokens, b_valid)


class PairwisePreferenceModel(_Backbone):
  """d(x, y, y') = f(x, y, y') − f(x, y', y) over [x, y, SEP, y'] (eqs. 4, 5)."""

  def __init__(self, config: LMConfig, *, sep_id: int, rngs: nnx.Rngs):
    if not 0 <= sep_id < config.vocab_size:
      raise ValueError(
          f"PairwisePreferenceModel: sep_id={sep_id} is outside the vocabulary "
          f"[0, {config.vocab_size})"
      )
    self.sep_id = sep_id
    super().__init__(config, 1, rngs=rngs)

  def pair_score(self, prompt_tokens, prompt_valid, a_tokens, a_valid, b_tokens, b_valid):
    """f(x, a, b) [B] (eq. 4), not antisymmetric on its own."""
    sep = jnp.full((a_tokens.shape[0], 1), self.sep_id, jnp.int32)
    seq = concat_segments(
        (prompt_tokens, prompt_valid),
        (a_tokens, a_valid),
        (sep, jnp.ones(sep.shape, bool)),
        (b_tokens, b_valid),
    )
    return self.features(*seq)[:, 0]

  def logit(self, prompt_tokens, prompt_valid, a_tokens, a_valid, b_tokens, b_valid):
    """d(x, a, b) [B] (eq. 5), one batch of 2B sequences in canonical order (eq. 7)."""
    x2 = tuple(jnp.concatenate([u, u]) for u in (prompt_tokens, prompt_valid))

    def pair(t1, v1, t2, v2):
      f = self.pair_score(
          *x2,
          jnp.concatenate([t1, t2]),
          jnp.concatenate([v1, v2]),
          jnp.concatenate([t2, t1]),
          jnp.concatenate([v2, v1]),
      )
      return f[: len(t1)] - f[len(t1) :]

    return _ordered_logit(pair, a_tokens, a_valid, b_tokens, b_valid)


class GeneralPreferenceModel(_Backbone):
  """GPM: v(x, y) ∈ R^{dim} (dim = 2k) and d = v_y^T R v_{y'} (eq. 6)."""

  def __init__(self, config: LMConfig, *, dim: int = 2, rngs: nnx.Rngs):
    if dim < 2 or dim % 2:
      raise ValueError(f"GeneralPreferenceModel: dim must be even and >= 2, got {dim}")
    super().__init__(config, dim, rngs=rngs)

  def embed(self, prompt_tokens, prompt_valid, tokens, valid) -> jax.Array:
    """v(x, y) [B, dim] float32."""
    return self.features(*concat_segments((prompt_tokens, prompt_valid), (tokens, valid)))

  def logit(self, prompt_tokens, prompt_valid, a_tokens, a_valid, b_tokens, b_valid):
    """d = v_a^T R v_b [B] (eq. 6), one forward per response (eq. 7 order)."""
    x2 = tuple(jnp.concatenate([u, u]) for u in (prompt_tokens, prompt_valid))

    def pair(t1, v1, t2, v2):
      v = self.embed(*x2, jnp.concatenate([t1, t2]), jnp.concatenate([v1, v2]))
      return skew_product(v[: len(t1)], v[len(t1) :])

    return _ordered_logit(pair, a_tokens, a_valid, b_tokens, b_valid)


def skew_product(u, v) -> jax.Array:
  """u^T R v for R = diag(J, ..., J), J = [[0, 1], [−1, 0]] (eq. 6): [B, 2k] x2 -> [B]."""
  return jnp.sum(u[:, 0::2] * v[:, 1::2] - u[:, 1::2] * v[:, 0::2], axis=-1)


# --------------------------------------------------------------------------- pure forms


def reward_forward(graphdef, params, tokens, valid=None) -> jax.Array:
  """Pure form of `RewardModel.__call__` over split state (for jit): rewards [B]."""
  return nnx.merge(graphdef, params)(tokens, valid)


def preference_logit(
    graphdef, params, prompt_tokens, prompt_valid, a_tokens, a_valid, b_tokens, b_valid
) -> jax.Array:
  """Pure form of any head model's `logit` (eqs. 3, 5, 6) over split state: [B]."""
  model = nnx.merge(graphdef, params)
  return model.logit(prompt_tokens, prompt_valid, a_tokens, a_valid, b_tokens, b_valid)


def head_sharding_rules(fsdp=("fsdp",), tensor="tensor") -> list[parallel.Rule]:
  """`lm_sharding_rules` (suffix patterns, so they match "backbone/..." paths) plus the head,
  replicated (it is [H, 1] or [H, 2k])."""
  return [*lm_sharding_rules(fsdp, tensor), parallel.Rule(r"(^|/)score/kernel$", "replicate")]
