"""Judges: exact antisymmetry and P(a ≻ a) = ½ for every judge, hard ties, and the model
judges equal to direct model calls on packed prompt + response sequences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import judges
from alignjax.data import synthetic_language as sl
from alignjax.models import heads
from alignjax.models.lm_config import LMConfig

CONFIG = LMConfig(
    family="llama",
    vocab_size=sl.VOCAB_SIZE,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=48,
    max_position_embeddings=32,
)


def completions(seed, b=6, p=4, n=5):
  """Left-padded prompts and responses that stop after a random EOS, as the sampler returns."""
  rng = np.random.default_rng(seed)
  pt = rng.integers(3, sl.VOCAB_SIZE, (b, p))
  plen = rng.integers(1, p + 1, b)
  pv = np.arange(p)[None] >= p - plen[:, None]
  rt = rng.integers(3, sl.VOCAB_SIZE, (b, n))
  rlen = rng.integers(1, n + 1, b)
  rt[np.arange(b), rlen - 1] = sl.EOS_ID
  rv = np.arange(n)[None] < rlen[:, None]
  return judges.Completions(
      np.where(pv, pt, 0).astype(np.int32), pv, np.where(rv, rt, 0).astype(np.int32), rv
  )


def with_responses(c, other):
  return judges.Completions(c.prompt_tokens, c.prompt_valid, other.tokens, other.valid)


def length_reward(prompt, response):
  return float(len(response))


def cyclic(prompt, a, b):
  """Rock-paper-scissors over the first character's digit mod 3; 0.9 / 0.1 / ½."""
  da, db = (int(t[0]) % 3 if t and t[0].isdigit() else 0 for t in (a, b))
  return 0.5 if da == db else (0.9 if (da - db) % 3 == 1 else 0.1)


def all_judges():
  rm = heads.RewardModel(CONFIG, rngs=nnx.Rngs(0))
  pw = heads.PairwisePreferenceModel(CONFIG, sep_id=sl.VOCAB["="], rngs=nnx.Rngs(1))
  gpm = heads.GeneralPreferenceModel(CONFIG, dim=4, rngs=nnx.Rngs(2))
  return {
      "reward_fn": judges.RewardFunctionJudge(length_reward, sl.decode, temperature=2.0),
      "reward_fn_hard": judges.RewardFunctionJudge(length_reward, sl.decode, temperature=0),
      "preference_fn": judges.PreferenceFunctionJudge(cyclic, sl.decode),
      "reward_model": judges.RewardModelJudge(*nnx.split(rm)),
      "pairwise_model": judges.PreferenceModelJudge(*nnx.split(pw)),
      "gpm_model": judges.PreferenceModelJudge(*nnx.split(gpm)),
  }


@pytest.fixture(scope="module")
def judge_set():
  return all_judges()


@pytest.mark.parametrize(
    "name",
    ["reward_fn", "reward_fn_hard", "preference_fn", "reward_model", "pairwise_model", "gpm_model"],
)
def test_exact_antisymmetry_and_self_preference(judge_set, name):
  judge = judge_set[name]
  a = completions(0)
  b = with_responses(a, completions(1))
  pab = np.asarray(judge.win_probability(a, b), np.float64)
  pba = np.asarray(judge.win_probability(b, a), np.float64)
  assert pab.shape == (len(a),) and np.all((pab >= 0) & (pab <= 1))
  np.testing.assert_array_equal(pab + pba, np.ones(len(a)))  # exactly, eq. 1
  np.testing.assert_array_equal(np.asarray(judge.win_probability(a, a)), 0.5)
  # Equal real tokens with different padding garbage are the same response.
  messy = judges.Completions(
      a.prompt_tokens, a.prompt_valid, np.where(a.valid, a.tokens, 7), a.valid
  )
  np.testing.assert_array_equal(np.asarray(judge.win_probability(a, messy)), 0.5)
  assert not np.all(pab == 0.5)


def test_reward_function_judge_values_and_hard_ties():
  a = completions(0)
  b = with_responses(a, completions(1))
  for c, text in ((a, "12"), (b, "34")):  # row 0: a tie in length with different text
    c.tokens[0] = sl.encode(text, bos=False, eos=True) + [0] * (c.tokens.shape[1] - 3)
    c.valid[0] = np.arange(c.tokens.shape[1]) < 3
  ra = np.array([len(sl.decode(t[v])) for t, v in zip(a.tokens, a.valid)], float)
  rb = np.array([len(sl.decode(t[v])) for t, v in zip(b.tokens, b.valid)], float)
  soft = judges.RewardFunctionJudge(length_reward, sl.decode, temperature=2.0)
  np.testing.assert_allclose(soft.win_probability(a, b), 1 / (1 + np.exp(-(ra - rb) / 2)))
  np.testing.assert_array_equal(soft.reward(a), ra)
  hard = judges.RewardFunctionJudge(length_reward, sl.decode, temperature=0)
  want = np.where(ra > rb, 1.0, np.where(ra < rb, 0.0, 0.5))
  assert np.any(ra == rb), "the batch should contain a tie"
  np.testing.assert_array_equal(hard.win_probability(a, b), want)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    judges.RewardFunctionJudge(length_reward, sl.decode, temperature=-1)


def test_preference_function_judge_is_cyclic_and_symmetrised():
  judge = judges.PreferenceFunctionJudge(cyclic, sl.decode)
  x = np.full((3, 1), sl.BOS_ID, np.int32)
  ones = np.ones((3, 1), bool)
  digit = lambda ds: np.array([[sl.VOCAB[str(d)]] for d in ds], np.int32)
  a = judges.Completions(x, ones, digit([0, 1, 2]), ones)
  b = judges.Completions(x, ones, digit([1, 2, 0]), ones)
  np.testing.assert_allclose(judge.win_probability(b, a), [0.9, 0.9, 0.9])  # 1≻0, 2≻1, 0≻2
  lopsided = judges.PreferenceFunctionJudge(lambda x, s, t: 1.0, sl.decode)
  np.testing.assert_array_equal(lopsided.win_probability(a, b), 0.5)  # eq. 3
  with pytest.raises(TypeError, match="without a scalar reward"):
    judge.reward(a)
  bad = judges.PreferenceFunctionJudge(lambda x, s, t: 2.0, sl.decode)
  with pytest.raises(ValueError, match=r"need \[0, 1\]"):
    bad.win_probability(a, b)


@functools.partial(jax.jit, static_argnums=0)
def _hidden(graphdef, params, tokens, valid):
  return nnx.merge(graphdef, params).hidden_states(tokens, None, valid)[0]


def direct(judge, rows):
  """Head outputs [B, out] of unpadded sequences `rows`, computed independently of the judge:
  right-padded, hidden state picked at each row's end by hand, times the head kernel."""
  model = nnx.merge(judge.graphdef, judge.params)
  lengths = np.array([len(r) for r in rows])
  tokens = np.zeros((len(rows), lengths.max()), np.int32)
  for i, r in enumerate(rows):
    tokens[i, : len(r)] = r
  valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
  h = np.asarray(_hidden(*nnx.split(model.backbone), jnp.asarray(tokens), jnp.asarray(valid)))
  return h[np.arange(len(rows)), lengths - 1] @ np.asarray(model.score.kernel[...])


def test_model_judges_equal_direct_model_calls(judge_set):
  a = completions(3)
  b = with_responses(a, completions(4, n=3))  # shorter responses are padded by the judge
  x = [a.prompt_tokens[i][a.prompt_valid[i]] for i in range(len(a))]
  ya = [a.tokens[i][a.valid[i]] for i in range(len(a))]
  yb = [b.tokens[i][b.valid[i]] for i in range(len(b))]
  sigmoid = lambda d: 1 / (1 + np.exp(-d))

  rm = judge_set["reward_model"]
  ra = direct(rm, [np.concatenate([p, y]) for p, y in zip(x, ya)])[:, 0]
  rb = direct(rm, [np.concatenate([p, y]) for p, y in zip(x, yb)])[:, 0]
  np.testing.assert_allclose(np.asarray(rm.reward(a)), ra, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rm.reward(b)), rb, atol=1e-5)
  np.testing.assert_allclose(rm.win_probability(a, b), sigmoid(ra - rb), atol=1e-5)

  pw = judge_set["pairwise_model"]
  sep = [sl.VOCAB["="]]
  f_ab = direct(pw, [np.concatenate([p, s, sep, t]) for p, s, t in zip(x, ya, yb)])[:, 0]
  f_ba = direct(pw, [np.concatenate([p, t, sep, s]) for p, s, t in zip(x, ya, yb)])[:, 0]
  np.testing.assert_allclose(pw.win_probability(a, b), sigmoid(f_ab - f_ba), atol=1e-5)

  gpm = judge_set["gpm_model"]
  va = direct(gpm, [np.concatenate([p, y]) for p, y in zip(x, ya)])
  vb = direct(gpm, [np.concatenate([p, y]) for p, y in zip(x, yb)])
  d = va[:, 0] * vb[:, 1] - va[:, 1] * vb[:, 0] + va[:, 2] * vb[:, 3] - va[:, 3] * vb[:, 2]
  np.testing.assert_allclose(gpm.win_probability(a, b), sigmoid(d), atol=1e-5)
  with pytest.raises(TypeError, match="without a scalar reward"):
    gpm.reward(a)


def test_bad_inputs_are_refused():
  a = completions(0)
  with pytest.raises(ValueError, match="batch sizes differ"):
    judges.Completions(a.prompt_tokens[:2], a.prompt_valid[:2], a.tokens, a.valid)
  with pytest.raises(ValueError, match="valid masks differ"):
    judges.Completions(a.prompt_tokens, a.prompt_valid[:, :2], a.tokens, a.valid)
  other = completions(5)
  j = judges.RewardFunctionJudge(length_reward, sl.decode)
  with pytest.raises(ValueError, match="same prompts"):
    j.win_probability(a, other)
  gpm = heads.GeneralPreferenceModel(CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="RewardModelJudge: expected a graphdef of"):
    judges.RewardModelJudge(*nnx.split(gpm))


class _FirstTokenJudge(judges.Judge):
  """P(a ≻ b) = f(first response tokens): `fn(ta, tb)`, to build judges that break eq. 1."""

  def __init__(self, fn):
    self.fn = fn

  def win_probability(self, a, b):
    return self.fn(np.asarray(a.tokens[:, 0], float), np.asarray(b.tokens[:, 0], float))


@pytest.mark.parametrize(
    "name",
    ["reward_fn", "reward_fn_hard", "preference_fn", "reward_model", "pairwise_model", "gpm_model"],
)
def test_check_judge_accepts_every_library_judge(judge_set, name):
  a = completions(3)
  judges.check_judge(judge_set[name], a, with_responses(a, completions(4)))


@pytest.mark.parametrize(
    "fn,message",
    [
        (
            lambda ta, tb: np.full(ta.shape, 0.7),
            r"_FirstTokenJudge is not antisymmetric: .* = 1\.4",
        ),
        (lambda ta, tb: 0.5 + (ta - tb), r"P\(a ≻ b\) outside \[0, 1\] on \d+ of 6 pairs"),
        (lambda ta, tb: (ta >= tb).astype(float), r"P\(a ≻ a\) = 1 for a response against itself"),
    ],
)
def test_check_judge_names_how_a_judge_breaks_eq_1(fn, message):
  a = completions(3)
  b = with_responses(a, completions(4))
  assert (a.tokens[:, 0] != b.tokens[:, 0]).all()  # no ties: only P(a ≻ a) sees equal tokens
  with pytest.raises(judges.JudgeError, match=message):
    judges.check_judge(_FirstTokenJudge(fn), a, b)
