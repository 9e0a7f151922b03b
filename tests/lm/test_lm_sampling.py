"""Tests of alignjax.lm.sampling against a non-cached full-forward loop and numpy filters."""

import functools
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from alignjax.kernels import skinny_matmul
from alignjax.lm import sampling, scoring
from alignjax.models.convert import pad_left
from alignjax.models.lm import TransformerLM, forward
from alignjax.models.lm_config import LMConfig

V = 32
CONFIG = LMConfig(
    family="llama",
    vocab_size=V,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    max_position_embeddings=64,
)
FWD = jax.jit(forward, static_argnums=0)
PROMPTS = [[1, 5, 9, 3, 7, 2, 11], [1, 4], [1, 30, 12, 8]]


@functools.lru_cache(maxsize=None)
def make(seed=0, scale=0.15):
  """(graphdef, params) of a random model with numpy-drawn weights (fast on CPU)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(CONFIG, rngs=nnx.Rngs(seed))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if path[-2].key == "scale" else 0.0
    return jnp.asarray(base + scale * rng.normal(size=x.shape), x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def full_logits(seq):
  """Logits [len, V] of one unpadded sequence, full forward without a cache (right-padded to
  one compiled length: causal attention keeps the first len logits unchanged)."""
  graphdef, params = make()
  padded = jnp.asarray([list(seq) + [0] * (32 - len(seq))], jnp.int32)
  return np.asarray(FWD(graphdef, params, padded)[0][0], np.float64)[: len(seq)]


def numpy_filter(z, temperature, top_k, top_p):
  """Independent eqs. 1-4: the kept set and log q over the vocabulary (float64)."""
  z = z / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.ones(V, bool)
  if 0 < top_k < V:
    keep &= z >= z[order[top_k - 1]]
  if top_p < 1:
    zk = np.where(keep, z, -np.inf)
    p = np.exp(zk - zk.max())
    p /= p.sum()
    sp = np.sort(p)[::-1]
    before = np.cumsum(sp) - sp
    threshold = sp[before < top_p].min()
    keep &= p >= threshold * (1 - 1e-6)
  zk = np.where(keep, z, -np.inf)
  return keep, zk - np.logaddexp.reduce(zk[keep])


def run(cfg, prompts=PROMPTS, key=0, **kw):
  graphdef, params = make()
  tokens, valid = pad_left(prompts, max_length=64)
  out = sampling.sample(graphdef, params, tokens, valid, jax.random.key(key), cfg, **kw)
  return jax.tree.map(np.asarray, out)


def test_greedy_equals_full_forward_loop():
  n = 8
  out = run(sampling.SamplingConfig(max_new_tokens=n, temperature=0.0))
  top1 = run(sampling.SamplingConfig(max_new_tokens=n, temperature=1.0, top_k=1), key=3)
  for b, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(n):
      seq.append(int(np.argmax(full_logits(seq)[-1])))
    np.testing.assert_array_equal(out.tokens[b], seq[len(prompt) :])
    np.testing.assert_array_equal(top1.tokens[b], seq[len(prompt) :])
  assert out.valid.all() and (out.lengths == n).all() and (out.log_probs == 0).all()
  np.testing.assert_allclose(top1.log_probs, 0.0, atol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, 1.0), (1.3, 0, 0.5), (0.9, 6, 0.8)])
def test_log_probs_equal_rescored_filtered_distribution(temperature, top_k, top_p):
  n = 6
  cfg = sampling.SamplingConfig(max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p)
  out = run(cfg, key=7)
  for b, prompt in enumerate(PROMPTS):
    seq = list(prompt) + [int(t) for t in out.tokens[b]]
    logits = full_logits(seq)
    for s in range(n):
      z, y = logits[len(prompt) + s - 1], int(out.tokens[b, s])
      keep, log_q = numpy_filter(z, temperature, top_k, top_p)
      assert keep[y], f"sampled token {y} outside the kept set (row {b}, step {s})"
      if top_k:
        assert (z > z[y]).sum() < top_k  # among the k best
      np.testing.assert_allclose(out.log_probs[b, s], log_q[y], atol=2e-4)
      model_lp = z[y] - np.logaddexp.reduce(z)
      np.testing.assert_allclose(out.model_log_probs[b, s], model_lp, atol=2e-4)


def test_model_log_probs_equal_the_scorers_teacher_forced_log_probs():
  """At T = 1 without filtering, the sampler's log-probs of its own samples (both kinds) are
  `alignjax.lm.scoring`'s teacher-forced log-probs of the continuations (eq. 5 = eq. 1)."""
  n = 6
  cfg = sampling.SamplingConfig(max_new_tokens=n, temperature=1.0, eos_ids=(3,))
  out = run(cfg, key=11)
  graphdef, params = make()
  prompts, valid = pad_left(PROMPTS, max_length=8)
  tokens = np.concatenate([prompts, out.tokens], axis=1)
  mask = np.concatenate([np.zeros_like(valid), out.valid], axis=1)
  full_valid = np.concatenate([valid, out.valid], axis=1)
  scored = jax.jit(scoring.score, static_argnums=0)(graphdef, params, tokens, full_valid, mask)
  np.testing.assert_allclose(np.asarray(scored.log_probs)[:, -n:], out.model_log_probs, atol=1e-5)
  np.testing.assert_allclose(out.log_probs, out.model_log_probs, atol=1e-6)
  np.testing.assert_allclose(np.asarray(scored.sums), out.model_log_probs.sum(-1), atol=1e-4)
  assert (out.model_log_probs < 0).sum() >= 2 * n


def test_prefill_then_decode_equals_generate():
  """`sample` runs two programs (prefill, then the decode loop with the state donated);
  one jitted `generate` must give the same outputs, and the prefill state holds token 1."""
  n = 5
  cfg = sampling.SamplingConfig(max_new_tokens=n, temperature=1.1, top_k=8, eos_ids=(3,))
  graphdef, params = make()
  tokens, valid = (jnp.asarray(x) for x in pad_left(PROMPTS, max_length=16))
  key = jax.random.key(5)
  whole = jax.tree.map(
      np.asarray,
      jax.jit(sampling.generate, static_argnums=(0, 5))(graphdef, params, tokens, valid, key, cfg),
  )
  state = jax.jit(sampling.prefill, static_argnums=(0, 5))(
      graphdef, params, tokens, valid, key, cfg
  )
  p = tokens.shape[1]
  assert int(state.step) == 1 and int(state.cache.index) == p and state.cache.max_len == p + n
  np.testing.assert_array_equal(state.prompt_len, [len(q) for q in PROMPTS])
  np.testing.assert_array_equal(state.tokens[:, 0], whole.tokens[:, 0])
  assert (np.asarray(state.tokens[:, 1:]) == cfg.pad_id).all()
  out = run(cfg, key=5)  # sample(): the jitted prefill and decode programs, then finish
  np.testing.assert_array_equal(out.tokens, whole.tokens)
  np.testing.assert_array_equal(out.valid, whole.valid)
  np.testing.assert_array_equal(out.lengths, whole.valid.sum(-1))
  assert (out.lengths < n).any()  # an EOS stopped a row early
  np.testing.assert_allclose(out.log_probs, whole.log_probs, atol=1e-5)
  np.testing.assert_allclose(out.model_log_probs, whole.model_log_probs, atol=1e-5)


def decode_args(cfg):
  """Arguments of the decode loop (graphdef, params, prefilled state, key, cfg)."""
  graphdef, params = make()
  tokens, valid = (jnp.asarray(x) for x in pad_left(PROMPTS, max_length=16))
  state = sampling.prefill(graphdef, params, tokens, valid, jax.random.key(0), cfg)
  return graphdef, params, state, jax.random.key(0), cfg


def test_cpu_decode_program_compiles_without_ynnpack_fusions():
  """On CPU the decode loop compiles with `CPU_DECODE_COMPILER_OPTIONS` (accepted by this
  jaxlib): no YNNPACK fusions, where the same loop compiled with the defaults has them."""
  args = decode_args(sampling.SamplingConfig(max_new_tokens=3, temperature=0.0))
  hlo = sampling.decode_jit(args[1]).lower(*args).compile().as_text()
  assert "ynn_fusion" not in hlo
  default = jax.jit(sampling.decode, static_argnums=(0, 4)).lower(*args).compile().as_text()
  if "ynn_fusion" not in default:
    pytest.skip(
        f"jaxlib {importlib.metadata.version('jaxlib')} compiles the default CPU decode loop "
        "without a 'ynn_fusion' (no YNNPACK fusions, or another name for them): the option "
        "has nothing to switch off here"
    )


def test_cpu_decode_program_updates_the_cache_in_place():
  """The CPU decode loop aliases the donated state, KV cache included, to its output, so the
  loop writes the cache in place (no copy of it in the program)."""
  args = decode_args(sampling.SamplingConfig(max_new_tokens=3, temperature=0.0))
  state = args[2]
  hlo = sampling.decode_jit(args[1]).lower(*args).compile().as_text()
  num_state = len(jax.tree.leaves(state))
  aliased = hlo.split("\n", 1)[0].count("may-alias")
  assert aliased == num_state, (aliased, num_state)
  cache_shape = "f32[%d,%d,%d,%d]" % state.cache.keys[0].shape
  assert not [l for l in hlo.splitlines() if " copy(" in l and cache_shape in l]


def test_filter_logits_nucleus_is_smallest_prefix():
  z = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(sampling.filter_logits(z, 1.0, 0, 0.8)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])  # 0.5 + 0.3 reaches 0.8
  kept = np.isfinite(np.asarray(sampling.filter_logits(z, 1.0, 0, 0.81)))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])
  kept = np.isfinite(np.asarray(sampling.filter_logits(z, 1.0, 2, 1.0)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])


def test_sampling_log_probs_over_vocabulary():
  z = np.random.default_rng(2).normal(size=(3, V)) * 2
  for t, k, p in [(0.8, 5, 0.9), (1.5, 0, 0.6), (1.0, 0, 1.0)]:
    got = np.asarray(
        sampling.sampling_log_probs(
            jnp.asarray(z, jnp.float32), sampling.SamplingConfig(1, t, k, p)
        )
    )
    for row in range(3):
      keep, log_q = numpy_filter(z[row], t, k, p)
      np.testing.assert_array_equal(np.isfinite(got[row]), keep)
      np.testing.assert_allclose(got[row][keep], log_q[keep], atol=1e-5)
  greedy = np.asarray(sampling.sampling_log_probs(jnp.asarray(z), sampling.SamplingConfig(1, 0.0)))
  np.testing.assert_array_equal(np.argmax(greedy, -1), np.argmax(z, -1))
  assert (np.isfinite(greedy).sum(-1) == 1).all() and (greedy.max(-1) == 0).all()


def test_eos_stops_rows_and_pads_after():
  n = 8
  greedy = run(sampling.SamplingConfig(max_new_tokens=n, temperature=0.0))
  eos = int(greedy.tokens[0, 2])
  out = run(sampling.SamplingConfig(max_new_tokens=n, temperature=0.0, eos_ids=(eos,), pad_id=-1))
  for b in range(len(PROMPTS)):
    row = list(greedy.tokens[b])
    stop = row.index(eos) + 1 if eos in row else n
    np.testing.assert_array_equal(out.tokens[b, :stop], row[:stop])
    assert (out.tokens[b, stop:] == -1).all()
    np.testing.assert_array_equal(out.valid[b], np.arange(n) < stop)
    assert out.lengths[b] == stop
  assert out.lengths[0] <= 3


def test_frequencies_match_softmax():
  prompt = [1, 5, 9]
  b = 4000
  out = run(
      sampling.SamplingConfig(max_new_tokens=1, temperature=1.0), prompts=[prompt] * b, key=11
  )
  z = full_logits(prompt)[-1]
  p = np.exp(z - np.logaddexp.reduce(z))
  counts = np.bincount(out.tokens[:, 0], minlength=V)
  expected = b * p
  big = expected >= 5  # chi-square on cells with enough mass, the rest pooled
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  chi2 = ((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum()
  assert chi2 < stats.chi2.ppf(0.999, len(obs) - 1), (chi2, len(obs))
  np.testing.assert_allclose(out.model_log_probs[:, 0], np.log(p[out.tokens[:, 0]]), atol=1e-4)


def test_cpu_decode_with_the_skinny_matmul_kernel_equals_decode_without():
  """On one CPU device `sample` decodes with the skinny-matrix kernel for every weight
  product (in the compiled program), and its samples equal those of the plain XLA decode."""
  graphdef, params = make()
  ok, why = skinny_matmul.available()
  if not ok:
    pytest.skip(f"the skinny_matmul kernel is unavailable: {why}")
  cfg = sampling.SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=10)
  tokens, valid = (jnp.asarray(x) for x in pad_left(PROMPTS, max_length=16))
  state = sampling.prefill(graphdef, params, tokens, valid, jax.random.key(3), cfg)
  with_kernel = sampling.decode_jit(params)
  without = sampling.decode_jit(params, kernel=False)
  hlo = with_kernel.lower(graphdef, params, state, jax.random.key(3), cfg).compile().as_text()
  calls = hlo.count(f'custom_call_target="{skinny_matmul.TARGET}"')
  assert calls == CONFIG.num_layers * 7 + 1, calls  # q k v o gate up down per layer, lm_head
  assert (
      skinny_matmul.TARGET
      not in without.lower(graphdef, params, state, jax.random.key(3), cfg).compile().as_text()
  )
  a = sampling.finish(
      with_kernel(graphdef, params, jax.tree.map(jnp.copy, state), jax.random.key(3), cfg)
  )
  b = sampling.finish(without(graphdef, params, state, jax.random.key(3), cfg))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-5)
  np.testing.assert_allclose(a.model_log_probs, b.model_log_probs, atol=1e-5)


def test_prompt_buckets_bound_compilations():
  cfg = sampling.SamplingConfig(max_new_tokens=2, temperature=1.0, top_k=5)
  graphdef, params = make()
  jits = (sampling._prefill_jit, sampling.decode_jit(params))  # pylint: disable=protected-access
  before = [j._cache_size() for j in jits]  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  for length in (1, 3, 9, 16, 17, 30, 33, 40, 47):
    prompts = [list(rng.integers(3, V, size=length)), [1]]
    out = run(cfg, prompts=prompts, max_prompt_len=48)
    assert out.tokens.shape == (2, 2)
  compiled = [j._cache_size() - b for j, b in zip(jits, before)]  # pylint: disable=protected-access
  assert max(compiled) <= 3, compiled  # buckets 16, 32, 48
  assert [sampling.bucket_length(n, 48) for n in (1, 16, 17, 33, 48)] == [16, 16, 32, 48, 48]


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="maximum prompt length 48"):
    run(sampling.SamplingConfig(max_new_tokens=2), prompts=[[1] * 49], max_prompt_len=48)
  with pytest.raises(ValueError, match="maximum prompt length 62"):
    run(sampling.SamplingConfig(max_new_tokens=2), prompts=[[1] * 63])
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingConfig(max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplingConfig(max_new_tokens=2, temperature=-1.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.SamplingConfig(max_new_tokens=0)
  graphdef, params = make()
  with pytest.raises(ValueError, match="left-padded"):
    sampling.sample(
        graphdef,
        params,
        np.ones((1, 4), np.int32),
        np.array([[True, True, True, False]]),
        jax.random.key(0),
        sampling.SamplingConfig(max_new_tokens=2),
    )
