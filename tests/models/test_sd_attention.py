"""alignjax.models.sd.attention: the CPU's blocked path equals jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models.sd import attention as attn


def _qkv(length, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(2, length, 4, 8)).astype(np.float32)) for _ in range(3)]


@pytest.mark.parametrize("scale,extra_keys", [(None, 0), (0.3, 76)])
def test_blocked_attention_equals_the_fused_program_and_its_gradient(scale, extra_keys):
  q, _, _ = _qkv(4 * attn.QUERY_BLOCK)
  _, k, v = _qkv(4 * attn.QUERY_BLOCK + extra_keys, seed=1)
  assert attn._blocked_applies(q, k, None, False) == (jax.default_backend() == "cpu")
  got = attn._blocked_attention(q, k, v, scale)
  want = jax.nn.dot_product_attention(q, k, v, scale=scale)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
  loss = lambda f: lambda q: jnp.sum(f(q) ** 2)
  g = jax.grad(loss(lambda q: attn._blocked_attention(q, k, v, scale)))(q)
  g_want = jax.grad(loss(lambda q: jax.nn.dot_product_attention(q, k, v, scale=scale)))(q)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(attn.attention(q, k, v, scale=scale)), want, atol=2e-6)


def test_masked_causal_and_short_attention_keep_the_fused_program():
  q, k, v = _qkv(4 * attn.QUERY_BLOCK)
  assert not attn._blocked_applies(q, k, None, True)
  assert not attn._blocked_applies(q, k, jnp.ones((1, 1, 1, q.shape[1]), bool), False)
  assert not attn._blocked_applies(q[:, : 2 * attn.QUERY_BLOCK], k, None, False)
  assert not attn._blocked_applies(q[:, :-1], k, None, False)
  assert not attn._blocked_applies(q, k[:, :77], None, False)  # cross-attention's short keys
  with pytest.raises(ValueError, match="expected q"):
    attn.attention(q[0], k, v)
