"""Reward and preference heads: last-token reading under any mask, the BT / pairwise / GPM
logits re-derived independently, exact antisymmetry, pure forms and sharding rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import parallel
from alignjax.models import heads
from alignjax.models.lm_config import LMConfig

CONFIG = LMConfig(
    family="qwen2",
    vocab_size=24,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    qkv_bias=True,
    max_position_embeddings=32,
)
SEP = 3


@functools.partial(jax.jit, static_argnums=(0, 2))
def _call(graphdef, params, method, *args):
  return getattr(nnx.merge(graphdef, params), method)(*args)


def call(model, method, *args):
  """model.method(*args), jitted (eager op-by-op dispatch is slow on a shared CPU)."""
  graphdef, params = nnx.split(model)
  return _call(graphdef, params, method, *args)


def _batch(seed, b=4, p=3, n=4):
  rng = np.random.default_rng(seed)
  x = rng.integers(4, 24, (b, p)).astype(np.int32)
  xv = np.arange(p)[None] >= rng.integers(0, p, b)[:, None]  # left-padded, >= 1 token
  y = rng.integers(4, 24, (b, n)).astype(np.int32)
  yv = np.arange(n)[None] < rng.integers(1, n + 1, b)[:, None]  # valid until EOS
  return jnp.asarray(np.where(xv, x, 0)), jnp.asarray(xv), jnp.asarray(np.where(yv, y, 0)), yv


def test_last_token_and_packing_under_general_masks():
  valid = np.array([[0, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(heads.last_token_index(valid), [3, 1, 3, 0])
  hidden = jnp.arange(4 * 4 * 2, dtype=jnp.float32).reshape(4, 4, 2)
  np.testing.assert_array_equal(heads.pool_last(hidden, valid), hidden[np.arange(4), [3, 1, 3, 0]])
  tokens = np.array([[9, 5, 6, 7], [5, 6, 9, 9], [9, 5, 9, 6], [5, 9, 9, 9]])
  packed, pv = heads.pack_left(tokens, valid)
  np.testing.assert_array_equal(packed, [[0, 5, 6, 7], [0, 0, 5, 6], [0, 0, 5, 6], [0, 0, 0, 5]])
  np.testing.assert_array_equal(pv, np.arange(4)[None] >= [[1], [2], [2], [3]])


def test_reward_reads_the_last_real_token_whatever_the_padding():
  model = heads.RewardModel(CONFIG, rngs=nnx.Rngs(0))
  x, xv, y, yv = _batch(0)
  packed = heads.concat_segments((x, xv), (y, yv))
  holey = jnp.concatenate([x, y], 1), jnp.concatenate([xv, yv], 1)
  r = call(model, "reward", x, xv, y, yv)
  assert r.shape == (4,) and r.dtype == jnp.float32
  np.testing.assert_allclose(call(model, "__call__", *holey), r, atol=1e-5)
  np.testing.assert_array_equal(call(model, "__call__", *packed), r)
  # Independently: the same sequences right-padded, hidden state at each one's end, times w.
  lengths = np.asarray(xv).sum(1) + yv.sum(1)
  right = np.zeros((4, 7), np.int32)
  for i in range(4):
    right[i, : lengths[i]] = np.concatenate([np.asarray(x[i])[xv[i]], np.asarray(y[i])[yv[i]]])
  rv = np.arange(7)[None] < lengths[:, None]
  h, _ = _hidden(*nnx.split(model.backbone), jnp.asarray(right), jnp.asarray(rv))
  want = np.asarray(h)[np.arange(4), lengths - 1] @ np.asarray(model.score.kernel[...])[:, 0]
  np.testing.assert_allclose(r, want, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _hidden(graphdef, params, tokens, valid):
  return nnx.merge(graphdef, params).hidden_states(tokens, None, valid)


def test_bradley_terry_logit_and_exact_win_probability():
  model = heads.RewardModel(CONFIG, rngs=nnx.Rngs(1))
  x, xv, a, av = _batch(1)
  _, _, b, bv = _batch(2)
  d = call(model, "logit", x, xv, a, av, b, bv)
  want = call(model, "reward", x, xv, a, av) - call(model, "reward", x, xv, b, bv)
  np.testing.assert_allclose(d, want, atol=1e-5)  # eq. 3
  np.testing.assert_array_equal(call(model, "logit", x, xv, b, bv, a, av), -d)  # eq. 7
  np.testing.assert_array_equal(call(model, "logit", x, xv, a, av, a, av), 0.0)
  logits = jnp.array([-30.0, -1.3, 0.0, 0.7, 12.0])
  p = heads.win_probability(logits)
  np.testing.assert_allclose(p, jax.nn.sigmoid(logits), atol=1e-7)
  np.testing.assert_array_equal(p + heads.win_probability(-logits), 1.0)  # eq. 8
  assert float(p[2]) == 0.5


def test_pairwise_logit_is_f_ab_minus_f_ba():
  model = heads.PairwisePreferenceModel(CONFIG, sep_id=SEP, rngs=nnx.Rngs(2))
  x, xv, a, av = _batch(3)
  _, _, b, bv = _batch(4)
  d = call(model, "logit", x, xv, a, av, b, bv)
  f_ab = call(model, "pair_score", x, xv, a, av, b, bv)
  f_ba = call(model, "pair_score", x, xv, b, bv, a, av)
  np.testing.assert_allclose(d, f_ab - f_ba, atol=1e-5)  # eq. 5
  assert np.all(np.abs(np.asarray(f_ab + f_ba)) > 0)  # f itself is not antisymmetric
  np.testing.assert_array_equal(call(model, "logit", x, xv, b, bv, a, av), -d)
  np.testing.assert_array_equal(call(model, "logit", x, xv, b, bv, b, bv), 0.0)
  # The SEP sequence, built by hand for row 0.
  seq = np.concatenate([np.asarray(u)[m] for u, m in ((x[0], xv[0]), (a[0], av[0]))])
  seq = np.concatenate([seq, [SEP], np.asarray(b[0])[bv[0]]])[None]
  np.testing.assert_allclose(
      call(model, "features", jnp.asarray(seq), jnp.ones(seq.shape, bool))[0, 0], f_ab[0], atol=1e-5
  )


def test_gpm_skew_product_and_cyclic_expressiveness():
  u = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  v = jnp.array([[5.0, 6.0, 7.0, 8.0]])
  r = np.kron(np.eye(2), np.array([[0.0, 1.0], [-1.0, 0.0]]))
  np.testing.assert_allclose(heads.skew_product(u, v), (np.asarray(u) @ r @ np.asarray(v).T)[0])
  theta = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])  # rock, paper, scissors
  e = jnp.asarray(np.stack([np.cos(theta), np.sin(theta)], 1))
  d = heads.skew_product(e, jnp.roll(e, -1, 0))  # each vs the next: all the same sign
  np.testing.assert_allclose(d, np.sin(theta[[1, 2, 0]] - theta), atol=1e-6)
  model = heads.GeneralPreferenceModel(CONFIG, dim=4, rngs=nnx.Rngs(3))
  x, xv, a, av = _batch(5)
  _, _, b, bv = _batch(6)
  want = heads.skew_product(call(model, "embed", x, xv, a, av), call(model, "embed", x, xv, b, bv))
  d = call(model, "logit", x, xv, a, av, b, bv)
  np.testing.assert_allclose(d, want, atol=1e-5)
  np.testing.assert_array_equal(call(model, "logit", x, xv, b, bv, a, av), -d)


@pytest.mark.parametrize("kind", ["reward", "pairwise", "gpm"])
def test_pure_forms_under_jit_equal_the_methods(kind):
  make = {
      "reward": lambda: heads.RewardModel(CONFIG, rngs=nnx.Rngs(4)),
      "pairwise": lambda: heads.PairwisePreferenceModel(CONFIG, sep_id=SEP, rngs=nnx.Rngs(4)),
      "gpm": lambda: heads.GeneralPreferenceModel(CONFIG, dim=2, rngs=nnx.Rngs(4)),
  }[kind]
  model = make()
  graphdef, params = nnx.split(model)
  x, xv, a, av = _batch(7)
  _, _, b, bv = _batch(8)
  fn = jax.jit(heads.preference_logit, static_argnums=0)
  np.testing.assert_allclose(
      fn(graphdef, params, x, xv, a, av, b, bv),
      call(model, "logit", x, xv, a, av, b, bv),
      atol=1e-6,
  )
  if kind == "reward":
    tokens, valid = heads.concat_segments((x, xv), (a, av))
    np.testing.assert_allclose(
        jax.jit(heads.reward_forward, static_argnums=0)(graphdef, params, tokens, valid),
        call(model, "__call__", tokens, valid),
        atol=1e-6,
    )


def test_head_sharding_rules_shard_the_backbone_and_replicate_the_head():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
  rules = heads.head_sharding_rules()
  spec = lambda p, s: parallel.spec_for(p, s, mesh, rules)
  assert spec("backbone/layers/0/mlp/up/kernel", (32, 48)) == jax.sharding.PartitionSpec(
      ("fsdp",), "tensor"
  )
  assert spec("score/kernel", (32, 1)) == jax.sharding.PartitionSpec()
  abstract = nnx.state(nnx.eval_shape(lambda: heads.RewardModel(CONFIG, rngs=nnx.Rngs(0))))
  shardings = parallel.param_shardings(abstract, mesh, rules)
  assert len(jax.tree_util.tree_leaves(shardings)) == len(jax.tree_util.tree_leaves(abstract))


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="sep_id=24 is outside the vocabulary"):
    heads.PairwisePreferenceModel(CONFIG, sep_id=24, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dim must be even"):
    heads.GeneralPreferenceModel(CONFIG, dim=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="same shape"):
    heads.canonical_order(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 4)))
