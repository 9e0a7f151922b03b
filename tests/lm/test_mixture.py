"""Tests of alignjax.lm.mixture: exact enumerated mixture probabilities, chi-square fit,
parity with `sampling.sample` for one model, filtering after mixing, mesh = one device."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from alignjax import parallel
from alignjax.kernels import skinny_matmul
from alignjax.lm import mixture, sampling, scoring
from alignjax.models.convert import pad_left
from alignjax.models.lm import TransformerLM, forward
from alignjax.models.lm_config import LMConfig

CONFIG = LMConfig(
    family="llama",
    vocab_size=32,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    max_position_embeddings=64,
)
SMALL = dataclasses.replace(CONFIG, num_layers=1, hidden_size=16, head_dim=4, mlp_dim=24)
OTHER = dataclasses.replace(SMALL, mlp_dim=40, tie_embeddings=True)  # another shape, same V
EOS = 3
TINY = LMConfig(  # vocabulary {0, 1, 2, EOS}: every response of 3 tokens can be enumerated
    family="llama",
    vocab_size=4,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=16,
    max_position_embeddings=16,
)
PROMPTS = [[1, 5, 9, 3, 7, 2, 11], [1, 4], [1, 30, 12, 8]]
FWD = jax.jit(forward, static_argnums=0)
SCORE = jax.jit(scoring.score, static_argnums=0)


@functools.lru_cache(maxsize=None)
def make(config=CONFIG, seed=0, scale=0.15):
  """(graphdef, params) of a random model with numpy-drawn weights (fast on CPU)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if parallel.path_str(path).endswith("scale") else 0.0
    return jnp.asarray(base + scale * rng.normal(size=x.shape), x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def host(tree):
  return jax.tree.map(np.asarray, tree)


def teacher_forced_logits(model, seqs, length=16):
  """Float64 logits [len(seqs), length, V] of unpadded sequences by one full forward without a
  cache (right-padded: causal attention leaves the first len(seq) logits unchanged)."""
  graphdef, params = model
  padded = jnp.asarray([list(s) + [0] * (length - len(s)) for s in seqs], jnp.int32)
  return np.asarray(FWD(graphdef, params, padded)[0], np.float64)


def log_softmax(z):
  return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def numpy_log_q(z, temperature, top_k=0, top_p=1.0):
  """Independent sampling eqs. 1-4 on one row z [V] (float64): log q, -inf outside the set."""
  z = z / temperature
  keep = np.ones(z.shape, bool)
  if 0 < top_k < z.size:
    keep &= z >= np.sort(z)[::-1][top_k - 1]
  if top_p < 1:
    p = np.exp(log_softmax(np.where(keep, z, -np.inf)))
    sp = np.sort(p)[::-1]
    keep &= p >= sp[np.cumsum(sp) - sp < top_p].min() * (1 - 1e-6)
  return log_softmax(np.where(keep, z, -np.inf))


# ---------------------------------------------------------------------------------------------
# Exact distribution on an enumerable model (vocab 4, 3 new tokens)

TINY_PROMPT = [0, 1, 2]
TINY_N = 3
TINY_WEIGHTS = (0.7, 0.3)  # Nash-MD's (1 - beta, beta) with beta = 0.3
TINY_CONFIGS = {
    "T1": sampling.SamplingConfig(max_new_tokens=TINY_N, temperature=1.0, eos_ids=(EOS,)),
    "T0.7-top2": sampling.SamplingConfig(
        max_new_tokens=TINY_N, temperature=0.7, top_k=2, eos_ids=(EOS,)
    ),
}


def tiny_models():
  return make(TINY, seed=1, scale=0.6), make(TINY, seed=2, scale=0.6)


def responses():
  """Every response of <= TINY_N tokens that stops at its first EOS (1 + 3 + 9 + 27 = 40)."""
  out = set()
  for seq in itertools.product(range(TINY.vocab_size), repeat=TINY_N):
    out.add(seq[: seq.index(EOS) + 1] if EOS in seq else seq)
  return sorted(out)


@functools.lru_cache(maxsize=None)
def enumerated(name):
  """{response: exact log-prob under the filtered token-level mixture}, from teacher-forced
  full-forward logits of both models on every prefix (eqs. 1-3 in float64, product over
  steps): a computation independent of the sampler's cache, loop and key."""
  cfg = TINY_CONFIGS[name]
  rs = responses()
  seqs = [TINY_PROMPT + list(r) for r in rs]
  logits = [teacher_forced_logits(m, seqs) for m in tiny_models()]
  exact = {}
  for i, r in enumerate(rs):
    total = 0.0
    for s, y in enumerate(r):
      t = len(TINY_PROMPT) + s - 1  # the slot predicting response token s
      z_mix = sum(w * z[i, t] for w, z in zip(TINY_WEIGHTS, logits))
      total += numpy_log_q(z_mix, cfg.temperature, cfg.top_k, cfg.top_p)[y]
    exact[r] = total
  return exact


@functools.lru_cache(maxsize=None)
def tiny_samples(name, batch=4000):
  tokens, valid = pad_left([TINY_PROMPT] * batch, max_length=len(TINY_PROMPT))
  key, cfg = jax.random.key(17), TINY_CONFIGS[name]
  out = mixture.sample_mixture(tiny_models(), TINY_WEIGHTS, tokens, valid, key, cfg, min_bucket=4)
  return host(out)


def response_of(out, b):
  return tuple(int(t) for t in out.tokens[b, : out.lengths[b]])


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_log_probs_equal_the_enumerated_mixture_and_the_scorer(name):
  exact = enumerated(name)
  assert len(exact) == 40
  total = np.logaddexp.reduce(list(exact.values()))
  np.testing.assert_allclose(total, 0.0, atol=1e-9)  # the enumeration is a distribution
  out = tiny_samples(name)
  got = out.log_probs.sum(-1)
  want = np.array([exact[response_of(out, b)] for b in range(len(got))])
  # float32 sampler (KV cache) vs float64 maths on float32 full-forward logits (|z| ~ 4): the
  # two sets of logits differ by float32 rounding, so 1e-6 relative (~8 float32 ulps; seen
  # 5e-7, absolute 2e-6 on sums near -7.6), and the probabilities themselves to 1e-6 absolute
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=0, atol=1e-6)
  assert (out.log_probs[~out.valid] == 0).all() and (out.tokens[~out.valid] == 0).all()
  # per-model untempered log-probs = the teacher-forced scorer's (scoring eq. 1), model by model
  rows = sorted({response_of(out, b): b for b in range(len(got))}.values())
  prompt, pvalid = pad_left([TINY_PROMPT] * len(rows), max_length=len(TINY_PROMPT))
  seq = np.concatenate([prompt, out.tokens[rows]], axis=1)
  seq_valid = np.concatenate([pvalid, out.valid[rows]], axis=1)
  mask = np.concatenate([np.zeros_like(pvalid), out.valid[rows]], axis=1)
  for m, (graphdef, params) in enumerate(tiny_models()):
    scored = np.asarray(SCORE(graphdef, params, seq, seq_valid, mask).log_probs)[:, -TINY_N:]
    np.testing.assert_allclose(out.model_log_probs[m][rows], scored, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_sampled_frequencies_fit_the_enumerated_mixture(name):
  exact = enumerated(name)
  out = tiny_samples(name)
  rs = sorted(exact)
  index = {r: i for i, r in enumerate(rs)}
  counts = np.bincount([index[response_of(out, b)] for b in range(len(out.tokens))], minlength=40)
  expected = len(out.tokens) * np.exp([exact[r] for r in rs])
  big = expected >= 5  # cells with enough mass; the rest pooled into one cell
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0  # top-k leaves responses of probability 0: they must never be drawn
  assert obs[~keep].sum() == 0
  p = stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue
  assert p > 1e-3, (p, obs, exp)
  assert big.sum() >= 5  # a real test: several cells


def test_tiny_mixture_differs_from_each_model():
  """The two tiny models disagree, so the enumerated mixture is a real test of eq. 1."""
  exact = enumerated("T1")
  rs = sorted(exact)
  seqs = [TINY_PROMPT + list(r) for r in rs]
  for model in tiny_models():
    z = teacher_forced_logits(model, seqs)
    single = [
        sum(log_softmax(z[i, len(TINY_PROMPT) + s - 1])[y] for s, y in enumerate(r))
        for i, r in enumerate(rs)
    ]
    assert np.abs(np.exp(single) - np.exp([exact[r] for r in rs])).sum() > 0.05


# ---------------------------------------------------------------------------------------------
# Parity with sampling.sample, filtering after mixing, M = 3

SAMPLED = sampling.SamplingConfig(max_new_tokens=6, temperature=1.2, top_k=10, eos_ids=(3,))


def run_mixture(models, weights, cfg, prompts=PROMPTS, key=0, **kw):
  tokens, valid = pad_left(prompts, max_length=16)
  return host(
      mixture.sample_mixture(models, weights, tokens, valid, jax.random.key(key), cfg, **kw)
  )


def run_single(model, cfg, prompts=PROMPTS, key=0):
  tokens, valid = pad_left(prompts, max_length=16)
  return host(sampling.sample(*model, tokens, valid, jax.random.key(key), cfg))


def test_one_model_or_weight_one_equals_sampling():
  """Same key, same draws: M = 1 and weights (1, 0) reproduce `sampling.sample`."""
  cfg = dataclasses.replace(SAMPLED, top_p=0.9)
  a, b = make(SMALL, seed=6, scale=0.3), make(OTHER, seed=7, scale=0.3)
  for models, weights, single in [((a,), (1.0,), a), ((a, b), (1.0, 0.0), a)]:
    want = run_single(single, cfg, key=5)
    got = run_mixture(models, weights, cfg, key=5)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=0, atol=1e-6)
    m = models.index(single)
    np.testing.assert_allclose(got.model_log_probs[m], want.model_log_probs, rtol=0, atol=1e-6)
    assert got.model_log_probs.shape == (len(models),) + want.tokens.shape
  assert (want.log_probs < 0).sum() > 5 and len({tuple(r) for r in want.tokens}) == 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 4, 1.0), (1.3, 0, 0.6)])
def test_three_models_filtered_after_mixing_against_numpy(temperature, top_k, top_p):
  models = (make(SMALL, seed=1, scale=0.3), make(SMALL, seed=2, scale=0.3), make(OTHER, seed=3))
  weights = (0.5, 0.3, 0.2)
  n = 6
  cfg = sampling.SamplingConfig(n, temperature, top_k, top_p, eos_ids=(3,))
  out = run_mixture(models, weights, cfg, key=9)
  for b, prompt in enumerate(PROMPTS):
    seq = [list(prompt) + [int(t) for t in out.tokens[b]]]
    zs = [teacher_forced_logits(m, seq)[0] for m in models]
    for s in range(out.lengths[b]):
      t, y = len(prompt) + s - 1, int(out.tokens[b, s])
      log_q = numpy_log_q(sum(w * z[t] for w, z in zip(weights, zs)), temperature, top_k, top_p)
      assert np.isfinite(log_q[y]), f"token {y} outside the mixture's kept set ({b}, {s})"
      np.testing.assert_allclose(out.log_probs[b, s], log_q[y], atol=2e-5)
      for m, z in enumerate(zs):
        np.testing.assert_allclose(out.model_log_probs[m, b, s], log_softmax(z[t])[y], atol=2e-5)
    assert (out.model_log_probs[:, b, out.lengths[b] :] == 0).all()
  assert (out.log_probs < -0.05).sum() >= 4  # real draws, not a point mass


def test_mix_logits_and_mixture_log_probs():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 2, 7)) * 2
  w = np.array([0.2, 0.0, 0.8])
  z[1, 0, 0] = -np.inf  # a zero-weight model contributes nothing, not 0 * inf = nan
  got = np.asarray(mixture.mix_logits(jnp.asarray(z, jnp.float32), w))
  want = 0.2 * z[0] + 0.8 * z[2]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  cfg = sampling.SamplingConfig(1, temperature=0.9, top_k=3)
  lq = np.asarray(mixture.mixture_log_probs(jnp.asarray(z, jnp.float32), w, cfg))
  for row in range(2):
    np.testing.assert_allclose(lq[row], numpy_log_q(want[row], 0.9, 3), atol=1e-5)
    # eq. 2: mixing logits = normalised product of the models' probabilities to the weights
    geo = 0.2 * log_softmax(z[0, row]) + 0.8 * log_softmax(z[2, row])
    np.testing.assert_allclose(numpy_log_q(want[row], 1.0), log_softmax(geo), atol=1e-9)
  greedy = np.asarray(mixture.mixture_log_probs(jnp.asarray(z), w, sampling.SamplingConfig(1, 0)))
  np.testing.assert_array_equal(np.argmax(greedy, -1), np.argmax(want, -1))


def test_new_weights_do_not_recompile_and_greedy_follows_the_mixture():
  models = (make(SMALL, seed=1, scale=0.5), make(SMALL, seed=2, scale=0.5))
  cfg = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0)
  first = run_mixture(models, (0.5, 0.5), cfg)
  # pylint: disable-next=protected-access
  jits = (mixture._prefill_jit, mixture.mixture_decode_jit(models[0][1]))
  before = [j._cache_size() for j in jits]  # pylint: disable=protected-access
  outs = [run_mixture(models, (1 - beta, beta), cfg) for beta in (0.1, 0.9)]
  assert [j._cache_size() for j in jits] == before  # pylint: disable=protected-access
  for beta, out in zip((0.5, 0.1, 0.9), [first] + outs):
    for b, prompt in enumerate(PROMPTS):
      seq = list(prompt)
      for _ in range(4):
        zs = [teacher_forced_logits(m, [seq])[0, len(seq) - 1] for m in models]
        seq.append(int(np.argmax((1 - beta) * zs[0] + beta * zs[1])))
      np.testing.assert_array_equal(out.tokens[b], seq[len(prompt) :])
  assert (outs[0].tokens != outs[1].tokens).any()  # beta matters


def test_decode_loop_uses_the_kernel_and_updates_every_cache_in_place():
  models = (make(SMALL, seed=1), make(OTHER, seed=3))
  graphdefs, params = tuple(m[0] for m in models), tuple(m[1] for m in models)
  cfg = sampling.SamplingConfig(max_new_tokens=3, temperature=1.0)
  tokens, valid = (jnp.asarray(x) for x in pad_left(PROMPTS, max_length=16))
  w, key = jnp.asarray([0.6, 0.4]), jax.random.key(0)
  state = mixture.mixture_prefill(graphdefs, params, w, tokens, valid, key, cfg)
  assert len(state.caches) == 2 and state.caches[1].max_len == tokens.shape[1] + 3
  hlo = mixture.mixture_decode_jit(params).lower(graphdefs, params, w, state, key, cfg)
  hlo = hlo.compile().as_text()
  assert hlo.split("\n", 1)[0].count("may-alias") == len(jax.tree.leaves(state))
  for cache in state.caches:
    shape = "f32[%d,%d,%d,%d]" % cache.keys[0].shape
    assert not [line for line in hlo.splitlines() if " copy(" in line and shape in line]
  if skinny_matmul.available()[0]:
    calls = hlo.count(f'custom_call_target="{skinny_matmul.TARGET}"')
    assert calls == (SMALL.num_layers * 7 + 1) + OTHER.num_layers * 7, calls  # OTHER: tied head


# ---------------------------------------------------------------------------------------------
# Data parallel, bad inputs


def test_mixture_on_a_mesh_equals_one_device():
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, (2, 2, 2))))
  models = (make(SMALL, seed=4, scale=0.3), make(SMALL, seed=5, scale=0.3))
  prompts = PROMPTS + [[2, 3], [1, 6, 7, 8, 9, 10], [4], [1, 2, 3, 4, 5], [9, 9, 1]]
  tokens, valid = pad_left(prompts, max_length=16)
  key = jax.random.key(4)
  one = host(mixture.sample_mixture(models, (0.7, 0.3), tokens, valid, key, SAMPLED))
  out = mixture.sample_mixture(models, (0.7, 0.3), tokens, valid, key, SAMPLED, mesh=mesh)
  assert out.tokens.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  out = host(out)
  np.testing.assert_array_equal(out.tokens, one.tokens)
  np.testing.assert_array_equal(out.valid, one.valid)
  np.testing.assert_allclose(out.log_probs, one.log_probs, atol=1e-5)
  np.testing.assert_allclose(out.model_log_probs, one.model_log_probs, atol=1e-5)
  assert len({tuple(row) for row in one.tokens}) > 4 and (one.lengths < 6).any()
  with pytest.raises(parallel.ShardingError, match="not divisible"):
    mixture.sample_mixture(models, (0.7, 0.3), tokens[:7], valid[:7], key, SAMPLED, mesh=mesh)


def test_bad_inputs_raise_clear_errors():
  a = make(SMALL, seed=4)
  cfg = sampling.SamplingConfig(max_new_tokens=2)
  tokens, valid = pad_left([[1, 2]], max_length=4)
  key = jax.random.key(0)
  cases = [
      (((a, a), (0.5, 0.6)), "sum to 1.1"),
      (((a, a), (1.5, -0.5)), "finite and >= 0"),
      (((a, a), (1.0,)), r"expected \(2,\): one weight per model"),
      (((a, a), (np.nan, 1.0)), "finite"),
      (((), ()), "non-empty tuple"),
      ((a, (1.0,)), r"models\[0\] is a GraphDef.*\(\(graphdef, params\),\)"),
      (((a, "ref"), (0.5, 0.5)), r"models\[1\] is a str"),
      (((a, make(TINY)), (0.5, 0.5)), "model 0 has vocab_size=32 but model 1 has vocab_size=4"),
  ]
  for (models, weights), match in cases:
    with pytest.raises(ValueError, match=match):
      mixture.sample_mixture(models, weights, tokens, valid, key, cfg)
  with pytest.raises(ValueError, match="at least one model"):
    mixture.check_weights((), 0)
  with pytest.raises(ValueError, match="left-padded"):
    mixture.sample_mixture((a,), (1.0,), [[1, 2, 0]], [[True, True, False]], key, cfg)
  with pytest.raises(ValueError, match="maximum prompt length 13"):
    mixture.sample_mixture(
        (a, a), (1.0, 0.0), [[1] * 14], [[True] * 14], key, cfg, max_prompt_len=13
    )
  with pytest.raises(ValueError, match="smallest max_position_embeddings=16"):
    small_pos = make(dataclasses.replace(SMALL, max_position_embeddings=16), seed=4)
    mixture.sample_mixture((a, small_pos), (0.5, 0.5), tokens, valid, key, cfg, max_prompt_len=15)
