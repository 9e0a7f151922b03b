"""Parity of `TransformerLM` (loaded by `load_hf_lm`) with transformers on tiny random models:
float32 logits on batched left-padded inputs, and 32 greedy tokens through the KV cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alignjax.models.convert import load_hf_lm
from alignjax.models.lm import forward, init_cache, positions_from_mask
from test_lm_hf_models import (
    FAMILIES,
    hf_checkpoint,
    hf_model,
    left_padded_batch,
    one_torch_thread,
)

NEW_TOKENS = 32


@functools.lru_cache(maxsize=None)
def ours(family):
  model, config = load_hf_lm(hf_checkpoint(family))
  graphdef, params = nnx.split(model)
  return graphdef, params, config


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
  graphdef, params, _ = ours(family)
  tokens, valid = left_padded_batch(seed=1)
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  with torch.no_grad(), one_torch_thread():
    ref = hf_model(family)(
        input_ids=torch.tensor(tokens),
        attention_mask=torch.tensor(valid.astype(np.int64)),
        position_ids=torch.tensor(positions),
    ).logits.numpy()
  logits, _ = jax.jit(forward, static_argnums=0)(
      graphdef, params, jnp.asarray(tokens), None, jnp.asarray(valid)
  )
  logits = np.asarray(logits)
  assert logits.dtype == np.float32 and logits.shape == ref.shape
  np.testing.assert_allclose(logits[valid], ref[valid], atol=1e-4, rtol=0)
  assert np.abs(ref[valid]).max() > 1.0  # the comparison is not between near-zero logits


def greedy(graphdef, params, config, tokens, valid, steps):
  """Greedy decoding through the KV cache, one token per call (a single compilation): the
  prompt (padding included, marked invalid), then the generated tokens."""
  b, l = tokens.shape

  @jax.jit
  def step(params, token, position, valid, cache):
    logits, cache = forward(
        graphdef, params, token[:, None], position[:, None], valid[:, None], cache
    )
    return jnp.argmax(logits[:, 0], -1), cache

  # Committed device arrays throughout, so that `step` compiles once.
  device = jax.devices()[0]
  tokens, valid = jax.device_put((tokens, valid), device)
  positions = jax.device_put(positions_from_mask(valid), device)
  cache = jax.device_put(init_cache(config, b, l + steps), device)
  for t in range(l):
    token, cache = step(params, tokens[:, t], positions[:, t], valid[:, t], cache)
  out, position, ones = [], positions[:, -1], jax.device_put(jnp.ones((b,), bool), device)
  for _ in range(steps):
    out.append(np.asarray(token))
    position = position + 1
    token, cache = step(params, token, position, ones, cache)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  return np.stack(out, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family):
  graphdef, params, config = ours(family)
  tokens, valid = left_padded_batch(seed=2, lengths=(8, 6, 3), total=8)
  model = hf_model(family)
  model.generation_config.eos_token_id = None  # generate all 32 tokens (no EOS stop)
  with torch.no_grad(), one_torch_thread():
    ref = model.generate(
        input_ids=torch.tensor(tokens),
        attention_mask=torch.tensor(valid.astype(np.int64)),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    ).numpy()[:, tokens.shape[1] :]
  assert ref.shape == (3, NEW_TOKENS)
  got = greedy(graphdef, params, config, jnp.asarray(tokens), jnp.asarray(valid), NEW_TOKENS)
  np.testing.assert_array_equal(got, ref)
