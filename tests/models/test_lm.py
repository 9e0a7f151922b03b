"""Unit tests of `alignjax.models.lm` / `lm_layers` / `lm_config` against independent
re-derivations (complex rotation, a naive attention loop, receptive-field arguments)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from alignjax.models.lm import (
    KVCache,
    TransformerLM,
    extend_cache,
    forward,
    init_cache,
    positions_from_mask,
)
from alignjax.models.lm_config import LMConfig
from alignjax.models.lm_layers import apply_rope, attend, rope_sin_cos

TINY = LMConfig(
    family="llama",
    vocab_size=50,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    max_position_embeddings=32,
)
TINY_GPT2 = dataclasses.replace(
    TINY,
    family="gpt2",
    num_kv_heads=4,
    gated_mlp=False,
    norm="layer",
    activation="gelu_tanh",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
    position_embedding="learned",
)
TINY_LOCAL = dataclasses.replace(
    TINY,
    family="gemma2",
    local_layers=(1,),
    sliding_window=3,
    post_norms=True,
    norm_offset=1.0,
    embed_scale=True,
    attn_logit_softcap=5.0,
    final_logit_softcap=8.0,
)


@functools.lru_cache(maxsize=None)
def make(config, seed=0):
  """(graphdef, params) of a random model. Values come from numpy (compiling jax.random for
  every parameter shape is slow on CPU) and are larger than the 0.02 init, so that every term
  matters numerically."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(seed))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 - config.norm_offset if path[-2].key == "scale" else 0.0
    return jnp.asarray(base + 0.3 * rng.normal(size=x.shape), x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


FWD = jax.jit(forward, static_argnums=0)


def batch(seed=0, lengths=(10, 7, 3), total=10, vocab=50):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (len(lengths), total))
  valid = np.arange(total)[None] >= total - np.array(lengths)[:, None]
  return jnp.asarray(tokens), jnp.asarray(valid)


def test_positions_from_mask():
  valid = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(
      positions_from_mask(valid), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
  )


def test_rope_is_a_complex_rotation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  positions = np.array([[0, 5, 17], [2, 3, 30]])
  f = TINY.inv_freq()
  got = np.asarray(apply_rope(jnp.asarray(x), *rope_sin_cos(jnp.asarray(positions), f)))
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * positions[:, :, None, None] * f)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), atol=1e-5)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_inv_freq_matches_transformers(scaling):
  hf = T.LlamaConfig(
      hidden_size=256,
      num_attention_heads=2,
      rope_theta=5e5,
      rope_scaling=scaling,
      max_position_embeddings=1024,
  )
  rope_type = (scaling or {}).get("rope_type", "default")
  if rope_type == "default":
    ref = 1.0 / 5e5 ** (np.arange(0, 128, 2) / 128)
  else:
    ref = ROPE_INIT_FUNCTIONS[rope_type](hf)[0].numpy()
  ours = LMConfig(
      family="llama",
      vocab_size=8,
      hidden_size=256,
      num_layers=1,
      num_heads=2,
      num_kv_heads=2,
      head_dim=128,
      mlp_dim=8,
      rope_theta=5e5,
      rope_type=rope_type,
      rope_factor=(scaling or {}).get("factor", 1.0),
      rope_original_max_positions=64,
  ).inv_freq()
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  if rope_type == "llama3":  # the scaling changes low frequencies only
    assert ours[0] == pytest.approx(ref[0]) and ours[-1] < 1.0 / 5e5 ** (126 / 128) / 7


def test_attend_matches_naive_loop():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, 2, 7, 8)).astype(np.float32) for _ in range(2))  # [B, K, S, D]
  allowed = rng.random((2, 5, 7)) < 0.6
  allowed[0, 2] = False  # a query with no allowed key (padding) must stay finite
  got = np.asarray(
      attend(
          jnp.asarray(q),
          jnp.asarray(k),
          jnp.asarray(v),
          jnp.asarray(allowed),
          scale=0.3,
          softcap=2.0,
      )
  )
  for b in range(2):
    for t in range(5):
      for n in range(4):
        s = 2.0 * np.tanh(0.3 * k[b, n // 2] @ q[b, t, n] / 2.0)
        w = np.exp(s - s.max()) * allowed[b, t] if allowed[b, t].any() else np.ones(7)
        np.testing.assert_allclose(got[b, t, n], w @ v[b, n // 2] / w.sum(), atol=1e-5)


@pytest.mark.parametrize("config", [TINY_LOCAL, TINY_GPT2], ids=["local_layers", "gpt2"])
def test_cached_prefill_and_decode_equal_full_forward(config):
  graphdef, params = make(config)
  tokens, valid = batch()
  positions = positions_from_mask(valid)
  full, none = FWD(graphdef, params, tokens, None, valid)
  assert none is None
  cache = init_cache(config, 3, 16)
  chunks, outs = [(0, 3), (3, 6), (6, 7), (7, 8), (8, 9), (9, 10)], []
  for a, b in chunks:  # two multi-token prefill chunks, then one token at a time
    logits, cache = FWD(graphdef, params, tokens[:, a:b], positions[:, a:b], valid[:, a:b], cache)
    outs.append(logits)
  assert isinstance(cache, KVCache) and int(cache.index) == 10
  np.testing.assert_array_equal(cache.valid[:, :10], valid)
  got = np.concatenate(outs, axis=1)
  np.testing.assert_allclose(got[valid], np.asarray(full)[valid], atol=1e-5)


def test_extended_prefill_cache_decodes_like_a_full_length_cache():
  """Prefill into a cache of exactly the prompt's 7 slots, extend it to 12, decode 3 tokens:
  same logits as the full forward, and the new slots start empty (zeros, invalid)."""
  graphdef, params = make(TINY_LOCAL)
  tokens, valid = batch()
  positions = positions_from_mask(valid)
  full, _ = FWD(graphdef, params, tokens, None, valid)
  _, cache = FWD(
      graphdef, params, tokens[:, :7], positions[:, :7], valid[:, :7], init_cache(TINY_LOCAL, 3, 7)
  )
  short = cache
  cache = extend_cache(cache, 12)
  assert cache.max_len == 12 and int(cache.index) == 7
  assert cache.keys[0].shape == (3, TINY_LOCAL.num_kv_heads, 12, TINY_LOCAL.head_dim)
  for k, k_short in zip(cache.keys + cache.values, short.keys + short.values):
    np.testing.assert_array_equal(k[:, :, :7], k_short)
    assert not np.asarray(k[:, :, 7:]).any()
  np.testing.assert_array_equal(cache.valid, np.pad(np.asarray(valid[:, :7]), ((0, 0), (0, 5))))
  np.testing.assert_array_equal(cache.positions[:, :7], positions[:, :7])
  for t in range(7, 10):
    logits, cache = FWD(
        graphdef, params, tokens[:, t : t + 1], positions[:, t : t + 1], valid[:, t : t + 1], cache
    )
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
  with pytest.raises(ValueError, match="max_len=5 is smaller than the cache's 7 slots"):
    extend_cache(short, 5)


def test_left_padding_does_not_change_logits():
  graphdef, params = make(TINY_LOCAL)
  tokens, valid = batch(lengths=(6, 6, 6), total=6)
  padded = jnp.concatenate([jnp.full((3, 4), 7), tokens], axis=1)
  logits, _ = FWD(graphdef, params, tokens, None, valid)
  logits_padded, _ = FWD(
      graphdef, params, padded, None, jnp.concatenate([jnp.zeros((3, 4), bool), valid], axis=1)
  )
  np.testing.assert_allclose(logits_padded[:, 4:], logits, atol=1e-5)


def test_sliding_window_bounds_the_receptive_field():
  # Two local layers with window W = 3: position t sees t - 2 (W - 1) .. t and nothing older.
  config = dataclasses.replace(TINY_LOCAL, local_layers=(0, 1))
  graphdef, params = make(config)
  tokens, valid = batch(lengths=(10,), total=10)
  base, _ = FWD(graphdef, params, tokens, None, valid)
  far, _ = FWD(graphdef, params, tokens.at[0, 4].set(tokens[0, 4] + 1), None, valid)
  near, _ = FWD(graphdef, params, tokens.at[0, 5].set(tokens[0, 5] + 1), None, valid)
  np.testing.assert_array_equal(far[0, 9], base[0, 9])
  assert np.abs(near[0, 9] - base[0, 9]).max() > 1e-3
  assert np.abs(far[0, 8] - base[0, 8]).max() > 1e-3


def test_gradients_are_finite_with_padding():
  graphdef, params = make(dataclasses.replace(TINY_LOCAL, num_layers=1, local_layers=(0,)))
  tokens, valid = batch()

  def loss(params):
    logits, _ = FWD(graphdef, params, tokens, None, valid)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * valid[:, 1:]) / valid[:, 1:].sum()

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_init_and_bfloat16_params():
  # Eager init compiles one random op per distinct shape: keep the shapes few.
  small = dataclasses.replace(
      TINY_GPT2,
      vocab_size=16,
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      num_kv_heads=2,
      mlp_dim=16,
      max_position_embeddings=16,
  )
  model = TransformerLM(small, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.layers[0].attn_norm.scale[...], np.ones(16))
  np.testing.assert_array_equal(model.layers[0].mlp.up.bias[...], np.zeros(16))
  assert np.std(model.layers[0].attn.q.kernel[...]) == pytest.approx(0.02, rel=0.2)
  assert model.pos_embed.embedding[...].shape == (16, 16)
  graphdef, params = make(TINY)
  graphdef16, params16 = make(dataclasses.replace(TINY, dtype="bfloat16"))
  assert {p.dtype for p in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)  # same weights, rounded
  tokens, valid = batch()
  ref, _ = FWD(graphdef, params, tokens, None, valid)
  got, _ = FWD(graphdef16, params16, tokens, None, valid)
  assert got.dtype == jnp.float32
  err = np.abs(np.asarray(got - ref))[np.asarray(valid)]
  assert 0 < err.max() < 0.1 * np.abs(np.asarray(ref)).max()


def test_too_long_inputs_and_bad_calls_are_refused():
  graphdef, params = make(TINY)
  model = nnx.merge(graphdef, params)
  with pytest.raises(ValueError, match="sequence length 33 exceeds max_position_embeddings=32"):
    model(jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match="max_len=40 exceeds .* max_position_embeddings=32"):
    init_cache(TINY, 1, 40)
  cache = init_cache(TINY, 1, 8)
  with pytest.raises(ValueError, match="sequence length 9 exceeds the KV cache max_len=8"):
    model(jnp.zeros((1, 9), jnp.int32), jnp.zeros((1, 9), jnp.int32), None, cache)
  with pytest.raises(ValueError, match="positions are required"):
    model(jnp.zeros((1, 2), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
    model(jnp.zeros((4,), jnp.int32))


def test_lm_config_validation_and_dict_round_trip():
  assert LMConfig.from_dict(TINY_LOCAL.to_dict()) == TINY_LOCAL
  with pytest.raises(ValueError, match="unknown field"):
    LMConfig.from_dict({**TINY.to_dict(), "n_embd": 3})
  with pytest.raises(ValueError, match="num_kv_heads=3: must divide num_heads=4"):
    dataclasses.replace(TINY, num_kv_heads=3)
  with pytest.raises(ValueError, match="activation='tanh'"):
    dataclasses.replace(TINY, activation="tanh")
  with pytest.raises(ValueError, match="local_layers need a positive sliding_window"):
    dataclasses.replace(TINY, local_layers=(0,))
  assert TINY_LOCAL.attention_scale == pytest.approx(8**-0.5)
  assert dataclasses.replace(TINY, query_pre_attn_scalar=24).attention_scale == pytest.approx(
      24**-0.5
  )
