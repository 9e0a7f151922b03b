r"""Judges: P(a ≻ b | x) for sampled completions, programmatic or learned, interchangeable.

The sample → judge → update loop hands a judge two `Completions` of the same prompts, token
batches as the LM sampler returns them (prompt tokens/valid [B, P] left-padded, response
tokens/valid [B, N], valid False after EOS). Every judge gives

    win_probability(a, b) = P(a ≻ b | x)  [B],
    P(a ≻ b) + P(b ≻ a) = 1 exactly,   P(a ≻ a) = ½ exactly                          (eq. 1)

and judges with a scalar reward (Bradley–Terry) also `reward(c)` [B]; a pure preference judge
raises. Judges:

  RewardFunctionJudge(fn, decode, temperature T): r = fn(prompt_text, response_text),
      P = σ((r_a − r_b) / T);  T = 0: P = [r_a > r_b] + ½ [r_a = r_b]                    (eq. 2)
  PreferenceFunctionJudge(fn, decode): q(a, b) = fn(prompt_text, a_text, b_text) ∈ [0, 1],
      symmetrised  P = ½ (q(a, b) + 1 − q(b, a))  (= q when q is already antisymmetric)   (eq. 3)
  RewardModelJudge(graphdef, params): P = σ(r(x, a) − r(x, b)), `heads` eqs. 2, 3
  PreferenceModelJudge(graphdef, params): P = σ(d(x, a, b)), `heads` eqs. 5, 6

Exactness (eq. 1) comes from the same device as in `alignjax.models.heads` (eqs. 7, 8): a
logit that is exactly antisymmetric and 0 for identical responses, mapped to a probability by
P = σ(|d|) or 1 − σ(|d|) by the sign of d. For the programmatic judges the "logit" is any
odd function: the reward difference, or q symmetrised in canonical order (eq. 3 computed with
the lexicographically smaller text first).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.models import heads

__all__ = [
    "Completions",
    "Judge",
    "JudgeError",
    "PreferenceFunctionJudge",
    "PreferenceModelJudge",
    "RewardFunctionJudge",
    "RewardModelJudge",
    "check_judge",
]


@dataclasses.dataclass(frozen=True)
class Completions:
  """Prompts [B, P] (left-padded) and sampled responses [B, N] (valid False after EOS)."""

  prompt_tokens: np.ndarray | jax.Array
  prompt_valid: np.ndarray | jax.Array
  tokens: np.ndarray | jax.Array
  valid: np.ndarray | jax.Array

  def __post_init__(self):
    shapes = {f.name: np.shape(getattr(self, f.name)) for f in dataclasses.fields(self)}
    if any(len(s) != 2 for s in shapes.values()):
      raise ValueError(f"Completions: every field must be [batch, length], got {shapes}")
    if shapes["prompt_tokens"] != shapes["prompt_valid"] or shapes["tokens"] != shapes["valid"]:
      raise ValueError(f"Completions: tokens and their valid masks differ in shape: {shapes}")
    if shapes["prompt_tokens"][0] != shapes["tokens"][0]:
      raise ValueError(f"Completions: prompt and response batch sizes differ: {shapes}")

  def __len__(self) -> int:
    return int(np.shape(self.tokens)[0])


def _check_pair(a: Completions, b: Completions) -> None:
  if len(a) != len(b):
    raise ValueError(f"win_probability: batch sizes differ ({len(a)} and {len(b)})")
  mask = lambda c: np.where(c.prompt_valid, c.prompt_tokens, -1)
  same = np.shape(a.prompt_tokens) == np.shape(b.prompt_tokens) and bool(np.all(mask(a) == mask(b)))
  if not same:
    raise ValueError("win_probability: a and b must share the same prompts")


def _pad_to(tokens, valid, n: int):
  extra = n - np.shape(tokens)[1]
  if extra == 0:
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool)
  return (
      jnp.pad(jnp.asarray(tokens, jnp.int32), ((0, 0), (0, extra))),
      jnp.pad(jnp.asarray(valid, bool), ((0, 0), (0, extra))),
  )


class Judge(abc.ABC):
  """The judge interface (module docstring); subclasses implement `win_probability`."""

  has_reward: bool = False

  @abc.abstractmethod
  def win_probability(self, a: Completions, b: Completions):
    """P(a ≻ b | x) [B] for completions of the same prompts."""

  def reward(self, c: Completions):
    raise TypeError(
        f"{type(self).__name__} is a pairwise preference judge without a scalar reward; use "
        f"win_probability(a, b), or a reward judge (RewardFunctionJudge, RewardModelJudge)"
    )


class JudgeError(ValueError):
  """A judge broke eq. 1 on a sample (a probability outside [0, 1], or not antisymmetric)."""


def check_judge(judge: Judge, a: Completions, b: Completions, *, atol: float = 1e-5) -> None:
  """Eq. 1 on a sample of pairs (a, b) of the same prompts: every P(a ≻ b) and P(b ≻ a) lies in
  [0, 1], |P(a ≻ b) + P(b ≻ a) − 1| ≤ atol and |P(a ≻ a) − ½| ≤ atol; raises JudgeError naming
  the judge, the worst pair and its values otherwise. The self-play losses (Nash-MD, SPO,
  online IPO) read P − ½ as an antisymmetric payoff, so a judge that is not fails the run
  before training instead of biasing it."""
  name = type(judge).__name__
  p_ab = np.asarray(judge.win_probability(a, b), np.float64)
  p_ba = np.asarray(judge.win_probability(b, a), np.float64)
  p_aa = np.asarray(judge.win_probability(a, a), np.float64)
  for label, p in (("P(a ≻ b)", p_ab), ("P(b ≻ a)", p_ba), ("P(a ≻ a)", p_aa)):
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))
    if bad.size:
      raise JudgeError(
          f"{name}: {label} outside [0, 1] on {bad.size} of {p.size} pairs "
          f"(row {bad[0]}: {p[bad[0]]!r}); a judge returns probabilities (alignjax.judges eq. 1)"
      )
  gap = np.abs(p_ab + p_ba - 1.0)
  if gap.max(initial=0.0) > atol:
    i = int(np.argmax(gap))
    raise JudgeError(
        f"{name} is not antisymmetric: P(a ≻ b) + P(b ≻ a) = {p_ab[i] + p_ba[i]:.6g} "
        f"(row {i}: {p_ab[i]:.6g} + {p_ba[i]:.6g}; max |P(a ≻ b) + P(b ≻ a) − 1| = "
        f"{gap.max():.3g} > {atol:g}); symmetrise it, P = ½ (q(a, b) + 1 − q(b, a)) "
        "(PreferenceFunctionJudge does)"
    )
  self_gap = np.abs(p_aa - 0.5)
  if self_gap.max(initial=0.0) > atol:
    i = int(np.argmax(self_gap))
    raise JudgeError(
        f"{name}: P(a ≻ a) = {p_aa[i]:.6g} for a response against itself (row {i}); "
        f"eq. 1 asks for ½ (max |P(a ≻ a) − ½| = {self_gap.max():.3g} > {atol:g})"
    )


# --------------------------------------------------------------------------- programmatic


def _texts(c: Completions, decode) -> tuple[list[str], list[str]]:
  pt, pv = np.asarray(c.prompt_tokens), np.asarray(c.prompt_valid, bool)
  rt, rv = np.asarray(c.tokens), np.asarray(c.valid, bool)
  prompts = [decode(pt[i][pv[i]].tolist()) for i in range(len(c))]
  return prompts, [decode(rt[i][rv[i]].tolist()) for i in range(len(c))]


class RewardFunctionJudge(Judge):
  """Eq. 2 from a python reward `fn(prompt_text, response_text) -> float` over decoded text
  (`decode(token_ids) -> str` of the real tokens only)."""

  has_reward = True

  def __init__(self, fn: Callable[[str, str], float], decode: Callable, temperature: float = 1.0):
    if not temperature >= 0:
      raise ValueError(f"RewardFunctionJudge: temperature must be >= 0, got {temperature}")
    self.fn, self.decode, self.temperature = fn, decode, float(temperature)

  def reward(self, c: Completions) -> np.ndarray:
    r = np.asarray([self.fn(x, y) for x, y in zip(*_texts(c, self.decode))], np.float64)
    if not np.all(np.isfinite(r)):
      raise ValueError(f"RewardFunctionJudge: the reward function returned non-finite values {r}")
    return r

  def win_probability(self, a: Completions, b: Completions) -> np.ndarray:
    _check_pair(a, b)
    d = self.reward(a) - self.reward(b)
    if self.temperature == 0:
      return np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))
    p = 1.0 / (1.0 + np.exp(-np.abs(d) / self.temperature))  # float64 on the host
    return np.where(d >= 0, p, 1.0 - p)  # eq. 1 (`heads` eq. 8)


class PreferenceFunctionJudge(Judge):
  """Eq. 3 from a python preference `fn(prompt, a_text, b_text) -> P(a ≻ b)` in [0, 1]; it
  may be intransitive (e.g. cyclic)."""

  def __init__(self, fn: Callable[[str, str, str], float], decode: Callable):
    self.fn, self.decode = fn, decode

  def _q(self, x: str, y: str, z: str) -> float:
    q = float(self.fn(x, y, z))
    if not 0.0 <= q <= 1.0:
      raise ValueError(f"PreferenceFunctionJudge: fn returned {q} for {(x, y, z)}; need [0, 1]")
    return q

  def win_probability(self, a: Completions, b: Completions) -> np.ndarray:
    _check_pair(a, b)
    (xs, ya), (_, yb) = _texts(a, self.decode), _texts(b, self.decode)
    out = np.empty(len(a))
    for i, (x, s, t) in enumerate(zip(xs, ya, yb)):
      if s == t:
        out[i] = 0.5
        continue
      lo, hi = (s, t) if s < t else (t, s)  # canonical order
      p = 0.5 * (self._q(x, lo, hi) + 1.0 - self._q(x, hi, lo))  # P(lo ≻ hi), eq. 3
      big = max(p, 1.0 - p)  # eq. 1: p and 1 - p summed exactly
      p = big if p >= 0.5 else 1.0 - big
      out[i] = p if s == lo else 1.0 - p
    return out


# --------------------------------------------------------------------------- learned


_logit_jit = jax.jit(heads.preference_logit, static_argnums=0)
_reward_jit = jax.jit(
    lambda graphdef, params, x, xv, t, v: nnx.merge(graphdef, params).reward(x, xv, t, v),
    static_argnums=0,
)


class _ModelJudge(Judge):
  model_types: tuple = ()

  def __init__(self, graphdef, params):
    model = nnx.merge(graphdef, params)
    if not isinstance(model, self.model_types):
      raise TypeError(
          f"{type(self).__name__}: expected a graphdef of {[m.__name__ for m in self.model_types]}"
          f", got {type(model).__name__}"
      )
    self.graphdef, self.params = graphdef, params

  def logit(self, a: Completions, b: Completions) -> jax.Array:
    """The exactly antisymmetric logit d(x, a, b) [B] (`heads` eq. 7)."""
    _check_pair(a, b)
    n = max(np.shape(a.tokens)[1], np.shape(b.tokens)[1])
    ta, va = _pad_to(a.tokens, a.valid, n)
    tb, vb = _pad_to(b.tokens, b.valid, n)
    x, xv = jnp.asarray(a.prompt_tokens, jnp.int32), jnp.asarray(a.prompt_valid, bool)
    return _logit_jit(self.graphdef, self.params, x, xv, ta, va, tb, vb)

  def win_probability(self, a: Completions, b: Completions) -> jax.Array:
    return heads.win_probability(self.logit(a, b))


class RewardModelJudge(_ModelJudge):
  """A learned Bradley–Terry `RewardModel` (split state) as a judge."""

  has_reward = True
  model_types = (heads.RewardModel,)

  def reward(self, c: Completions) -> jax.Array:
    """r(x, y) [B] of the packed prompt + response (`heads` eq. 2)."""
    args = (c.prompt_tokens, c.tokens)
    valids = (c.prompt_valid, c.valid)
    x, t = (jnp.asarray(u, jnp.int32) for u in args)
    xv, v = (jnp.asarray(u, bool) for u in valids)
    return _reward_jit(self.graphdef, self.params, x, xv, t, v)


class PreferenceModelJudge(_ModelJudge):
  """A learned pairwise or GPM preference model (split state) as a judge."""

  model_types = (heads.PairwisePreferenceModel, heads.GeneralPreferenceModel)
