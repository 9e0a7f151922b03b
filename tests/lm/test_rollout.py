"""Tests of alignjax.lm.rollout: the group layout, the sequences the scorer reads, and that the
scorer's log-probs of a rollout equal the sampler's own (eq. 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax.lm import rollout as rollout_lib
from alignjax.lm import sampling
from alignjax.models.convert import pad_left
from alignjax.models.lm import TransformerLM
from alignjax.models.lm_config import LMConfig

CONFIG = LMConfig(
    family="llama",
    vocab_size=24,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    max_position_embeddings=32,
)
PROMPTS = [[1, 5, 9, 3, 7], [1, 4], [1, 20, 12]]
EOS = 2


def model():
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(CONFIG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def fill(path, x):
    base = 1.0 if path[-2].key == "scale" else 0.0
    return jnp.asarray(base + 0.3 * rng.normal(size=x.shape), x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scorer_log_probs_of_a_rollout_equal_the_samplers(temperature):
  graphdef, params = model()
  tokens, valid = pad_left(PROMPTS, max_length=8, length=8)
  cfg = sampling.SamplingConfig(max_new_tokens=20, temperature=temperature, eos_ids=(EOS,))
  r = rollout_lib.rollout(
      graphdef, params, tokens, valid, jax.random.key(3), cfg, num_samples=3, min_bucket=8
  )
  assert r.tokens.shape == (9, 20) and r.prompt_tokens.shape == (9, 8)
  np.testing.assert_array_equal(np.asarray(r.prompt_tokens), np.repeat(tokens, 3, axis=0))
  lp = jax.jit(rollout_lib.response_log_probs, static_argnums=0)(graphdef, params, r)
  valid_r = np.asarray(r.valid)
  assert valid_r.sum() > 9 and (~valid_r).any()  # some rows stopped at EOS
  # eq. 3: the untempered model log-probs at the sampled tokens; 0 after EOS
  np.testing.assert_allclose(np.asarray(lp), np.asarray(r.model_log_probs), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(lp)[~valid_r] == 0)
  if temperature == 1.0:  # no filtering: the sampled distribution is the model's
    np.testing.assert_allclose(np.asarray(r.log_probs), np.asarray(r.model_log_probs), atol=1e-5)


def test_sequences_layout():
  r = rollout_lib.Rollout(
      prompt_tokens=jnp.asarray([[0, 1, 5]]),
      prompt_valid=jnp.asarray([[False, True, True]]),
      tokens=jnp.asarray([[7, 2, 0]]),
      valid=jnp.asarray([[True, True, False]]),
      log_probs=jnp.zeros((1, 3)),
      model_log_probs=jnp.zeros((1, 3)),
  )
  tokens, valid, mask = rollout_lib.sequences(r)
  np.testing.assert_array_equal(tokens, [[0, 1, 5, 7, 2, 0]])
  np.testing.assert_array_equal(valid, [[0, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 0]])
  assert r.rows(np.asarray([0, 0])).tokens.shape == (2, 3)


def test_repeat_groups_is_contiguous_and_checks_k():
  np.testing.assert_array_equal(rollout_lib.repeat_groups([[1], [2]], 2), [[1], [1], [2], [2]])
  with pytest.raises(ValueError, match="positive int"):
    rollout_lib.repeat_groups([[1]], 0)
