"""Data-parallel sampling and scoring on 8 fake CPU devices equal the 1-device results.

Meshes data x fsdp x tensor = 2x2x2 and 1x4x2: the batch is sharded over data x fsdp
(`parallel.batch_sharding`), the parameters by the LM rules (tensor-parallel heads and MLP,
FSDP over the hidden axis), so the programs really are partitioned; tokens must match the
single-device run exactly (same key), log-probs to 1e-5.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import parallel
from alignjax.lm import sampling, scoring
from alignjax.models.convert import pad_left
from alignjax.models.lm import LM_SHARDING_RULES, TransformerLM
from test_lm_sampling import CONFIG, PROMPTS

ONE_LAYER = dataclasses.replace(CONFIG, num_layers=1)  # cheapest to compile, still GQA

MESHES = [(2, 2, 2), (1, 4, 2)]
BATCH_PROMPTS = PROMPTS + [[2, 3], [1, 6, 7, 8, 9, 10], [4], [1, 2, 3, 4, 5]]  # B = 7
PROMPTS8 = BATCH_PROMPTS + [[9, 9, 1]]  # B = 8
SCORE = jax.jit(
    scoring.score, static_argnums=0, static_argnames=("seq_chunk", "vocab_chunk", "mesh")
)


@functools.lru_cache(maxsize=None)
def make(seed=0):
  """(graphdef, params) of a random one-layer LM, drawn on the host."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(ONE_LAYER, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if parallel.path_str(path).endswith("scale") else 0.0
    return jnp.asarray(base + 0.3 * rng.normal(size=x.shape), x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def mesh_of(shape):
  return parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))


def host(tree):
  return jax.tree.map(np.asarray, tree)


GREEDY = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0)
SAMPLED = sampling.SamplingConfig(max_new_tokens=6, temperature=1.2, top_k=10, eos_ids=(3,))


@pytest.mark.parametrize("shape, cfg", [((2, 2, 2), GREEDY), ((1, 4, 2), SAMPLED)])
def test_sample_on_a_mesh_equals_one_device(shape, cfg):
  mesh = mesh_of(shape)
  graphdef, params = make()
  tokens, valid = pad_left(PROMPTS8, max_length=16)
  key = jax.random.key(4)
  one = host(sampling.sample(graphdef, params, tokens, valid, key, cfg))
  out = sampling.sample(graphdef, params, tokens, valid, key, cfg, mesh=mesh)
  batch = parallel.batch_sharding(mesh)
  assert out.tokens.sharding.is_equivalent_to(batch, 2)  # rows stay on their devices
  assert out.tokens.addressable_shards[0].data.shape == (8 // (shape[0] * shape[1]), 6)
  out = host(out)
  np.testing.assert_array_equal(out.tokens, one.tokens)
  np.testing.assert_array_equal(out.valid, one.valid)
  np.testing.assert_allclose(out.log_probs, one.log_probs, atol=1e-5)
  np.testing.assert_allclose(out.model_log_probs, one.model_log_probs, atol=1e-5)
  assert len({tuple(row) for row in one.tokens}) > 4  # distinct rows: a real comparison
  if cfg is SAMPLED:
    assert (one.lengths < 6).any() and (one.log_probs < 0).any()  # EOS stops, real draws


def test_sample_keeps_parameters_already_on_the_mesh():
  """Parameters already sharded on the mesh (here by the default FSDP rules) are used as
  they are; single-device ones are placed by the LM rules."""
  mesh = mesh_of((2, 2, 2))
  graphdef, params = make()
  fsdp = parallel.put_on_mesh(params, mesh, [(".*", ("fsdp",))])
  kept = parallel.put_on_mesh(fsdp, mesh, LM_SHARDING_RULES)
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(fsdp), strict=True):
    assert a is b  # the very same arrays
  placed = parallel.put_on_mesh(params, mesh, LM_SHARDING_RULES)
  q = placed["layers"][0]["attn"]["q"]["kernel"][...]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  tokens, valid = pad_left(PROMPTS8, max_length=16)
  a = sampling.sample(graphdef, fsdp, tokens, valid, jax.random.key(4), GREEDY, mesh=mesh)
  b = sampling.sample(graphdef, params, tokens, valid, jax.random.key(4), GREEDY)
  np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("shape", MESHES)
def test_score_on_a_mesh_equals_one_device(shape):
  mesh = mesh_of(shape)
  graphdef, params = make()
  rng = np.random.default_rng(2)
  seqs = [list(rng.integers(0, 32, size=n)) for n in (12, 5, 9, 3, 11, 7, 2, 10)]
  tokens, valid = pad_left(seqs, max_length=12)
  mask = valid & (np.arange(12) >= 4)
  batch = parallel.batch_sharding(mesh)
  args = jax.device_put((tokens, valid, mask), batch)
  on_mesh = parallel.put_on_mesh(params, mesh, LM_SHARDING_RULES)
  for chunks in ({}, {"seq_chunk": 4, "vocab_chunk": 12}):
    one = host(SCORE(graphdef, params, tokens, valid, mask, **chunks))
    out = SCORE(graphdef, on_mesh, *args, mesh=mesh, **chunks)
    assert out.sums.sharding.is_equivalent_to(batch, 1)
    assert out.log_probs.sharding.is_equivalent_to(batch, 2)
    np.testing.assert_allclose(np.asarray(out.log_probs), one.log_probs, atol=1e-5, rtol=0)
    # Sums of 8 per-token terms of ~5 nats: the sharded program may add them in another order
    # (float32 rounding of ~40: 4e-6 per ulp), hence a relative bound too.
    np.testing.assert_allclose(np.asarray(out.sums), one.sums, atol=1e-5, rtol=2e-6)
    assert (one.log_probs != 0).sum() > 20


def test_sampler_log_probs_equal_the_scorer_on_a_mesh():
  """model_log_probs of samples at T = 1 without filtering are the teacher-forced log-probs
  of the same continuations (eq. 5 of sampling = eq. 1 of scoring), both data-parallel."""
  mesh = mesh_of((2, 2, 2))
  graphdef, params = make()
  prompts, valid = pad_left(PROMPTS8, max_length=8)
  n = 5
  cfg = sampling.SamplingConfig(max_new_tokens=n, temperature=1.0)
  out = host(sampling.sample(graphdef, params, prompts, valid, jax.random.key(9), cfg, mesh=mesh))
  np.testing.assert_allclose(out.log_probs, out.model_log_probs, atol=1e-6)
  tokens = np.concatenate([prompts, out.tokens], axis=1)
  full_valid = np.concatenate([valid, out.valid], axis=1)
  mask = np.concatenate([np.zeros_like(valid), out.valid], axis=1)
  args = jax.device_put((tokens, full_valid, mask), parallel.batch_sharding(mesh))
  scored = SCORE(graphdef, params, *args, mesh=mesh)
  np.testing.assert_allclose(
      np.asarray(scored.log_probs)[:, -n:], out.model_log_probs, atol=1e-5, rtol=0
  )


def test_a_batch_the_data_axes_do_not_divide_raises():
  mesh = mesh_of((2, 2, 2))
  graphdef, params = make()
  tokens, valid = pad_left(BATCH_PROMPTS, max_length=16)  # B = 7 over data*fsdp = 4
  cfg = sampling.SamplingConfig(max_new_tokens=2)
  with pytest.raises(parallel.ShardingError, match="sample: batch size 7 .* data\\*fsdp=4"):
    sampling.sample(graphdef, params, tokens, valid, jax.random.key(0), cfg, mesh=mesh)
  with pytest.raises(parallel.ShardingError, match="score: batch size 7 .* multiple of 4"):
    SCORE(graphdef, params, tokens, valid, valid, mesh=mesh)
