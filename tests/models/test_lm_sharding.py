"""LM sharding on 8 fake CPU devices: the forward pass on data=2 x fsdp=2 x tensor=2 equals the
single-device one (parameters loaded straight into their shards), and the LM rules of the one
engine (`alignjax.parallel`) reach every parameter *and its Adam moments* inside a TrainState."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import parallel
from alignjax.lm import scoring
from alignjax.models.convert import abstract_lm, load_hf_lm, read_hf_config
from alignjax.models.lm import (
    LM_SHARDING_RULES,
    TransformerLM,
    forward,
    lm_param_shardings,
    lm_sharding_rules,
    spec_for,
)
from alignjax.models.lm_config import LMConfig
from alignjax.training import OptimizerConfig, TrainState, make_optimizer
from test_lm_hf_models import hf_checkpoint, left_padded_batch

TINY = LMConfig(
    family="llama",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    max_position_embeddings=32,
)


def mesh8():
  return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


# Covers GQA + biases + tied embeddings, MQA (1 KV head: replicated over tensor), q/k norms
# with head_dim != hidden / heads, local layers + soft caps, and GPT-2's fused qkv.
@pytest.mark.parametrize("family", ["llama3_rope", "gemma", "qwen3", "gemma2", "gpt2"])
def test_forward_on_8_devices_equals_1_device(family):
  mesh = mesh8()
  single, _ = load_hf_lm(hf_checkpoint(family))
  sharded, config = load_hf_lm(hf_checkpoint(family), mesh=mesh)
  g1, p1 = nnx.split(single)
  g8, p8 = nnx.split(sharded)
  q = p8["layers"][0]["attn"]["q"]["kernel"][...]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (32, config.num_heads // 2, config.head_dim)
  assert p8["embed"]["embedding"][...].sharding.spec == P("tensor", "fsdp")

  tokens, valid = left_padded_batch(seed=3, lengths=(12, 10, 7, 4))
  batch = parallel.batch_sharding(mesh)
  fwd = jax.jit(forward, static_argnums=0)
  expected, _ = fwd(g1, p1, jnp.asarray(tokens), None, jnp.asarray(valid))
  got, _ = fwd(g8, p8, jax.device_put(tokens, batch), None, jax.device_put(valid, batch))
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=0)


def test_param_shardings_tree_and_fallback(caplog):
  mesh = mesh8()
  _, abstract = abstract_lm(read_hf_config(hf_checkpoint("llama")))
  shardings = lm_param_shardings(abstract, mesh)
  spec = lambda v: v.get_value().spec
  assert spec(shardings["layers"][1]["attn"]["o"]["kernel"]) == P("tensor", None, "fsdp")
  assert spec(shardings["layers"][1]["mlp"]["down"]["kernel"]) == P("tensor", "fsdp")
  assert spec(shardings["final_norm"]["scale"]) == P()
  # An axis the mesh does not divide is replicated rather than failing, and logged.
  with caplog.at_level(logging.INFO, logger="alignjax.parallel"):
    assert spec_for("embed/embedding", (127, 64), mesh) == P(None, "fsdp")
  assert "'embed/embedding' (shape (127, 64)) dimension 0 of size 127" in caplog.text
  # FSDP over both data-parallel axes (ZeRO-3 style).
  rules = lm_sharding_rules(fsdp=("data", "fsdp"))
  assert spec_for("layers/0/mlp/up/kernel", (64, 96), mesh, rules) == P(("data", "fsdp"), "tensor")
  # Suffix rules: the same spec inside a TrainState and its optimizer state; no match: P().
  assert spec_for("params/layers/3/attn/k/kernel", (64, 2, 8), mesh) == P("fsdp", "tensor", None)
  assert spec_for("opt_state/1/0/nu/lm_head/kernel", (64, 96), mesh) == P("fsdp", "tensor")
  assert spec_for("layers/0/attn/q_norm/scale", (8,), mesh) == P()
  assert spec_for("params/pos_embed/embedding", (32, 64), mesh) == P(None, "fsdp")
  assert spec_for("foo", (3,), mesh) == P()
  # Unknown axis names and too many entries still raise, even with indivisible="replicate".
  with pytest.raises(parallel.ShardingError, match="'model'.*valid axes: data, fsdp, tensor"):
    spec_for("layers/0/mlp/up/kernel", (64, 96), mesh, lm_sharding_rules(tensor="model"))
  with pytest.raises(parallel.ShardingError, match="3 entries but the leaf has shape"):
    spec_for("layers/0/attn/q/kernel", (64, 96), mesh)
  gpt2 = lm_param_shardings(abstract_lm(read_hf_config(hf_checkpoint("gpt2")))[1], mesh)
  assert spec(gpt2["pos_embed"]["embedding"]) == P(None, "fsdp")


def tiny_params(config=TINY, seed=0):
  """(graphdef, params) of a random tiny LM, drawn on the host (no init compilation)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if parallel.path_str(path).endswith("scale") else 0.0
    return jnp.asarray(base + 0.2 * rng.normal(size=x.shape), x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def rule_spec(path):
  """The spec of the first LM rule matching `path` (None if none does), by hand."""
  for pattern, spec, _ in LM_SHARDING_RULES:
    if re.search(pattern, path):
      return P(*spec)
  return None


def moment_param_path(path):
  """'opt_state/1/0/mu/layers/0/...' -> 'params/layers/0/...' (None if not an Adam moment)."""
  m = re.fullmatch(r"opt_state/(?:\d+/)*(mu|nu)/(.*)", path)
  return None if m is None else "params/" + m.group(2)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_rules_reach_every_leaf_of_an_adamw_train_state(shape):
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)))
  graphdef, host = tiny_params()
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
  create = lambda p: TrainState.create(p, optimizer, jax.random.key(0))
  shardings = parallel.param_shardings(jax.eval_shape(create, host), mesh, LM_SHARDING_RULES)
  specs = {p: s.spec for p, s in parallel.flatten_with_paths(shardings)[0]}
  matched = {p: rule_spec(p) for p in specs if rule_spec(p) is not None}
  n_params = len(jax.tree.leaves(host))
  n_ruled = sum(rule_spec(p) is not None for p, _ in parallel.flatten_with_paths(host)[0])
  assert n_ruled == 2 * 7 + 2  # per layer q k v o gate up down; embed, lm_head
  assert len(matched) == 3 * n_ruled  # the parameter, mu and nu
  for path, want in matched.items():  # every size divides here: exactly the rule's spec
    assert specs[path] == want != P(), path
  moments = {p: moment_param_path(p) for p in specs if moment_param_path(p)}
  assert len(moments) == 2 * n_params
  for path, param in moments.items():
    assert specs[path] == specs[param], (path, param)
  for path in ("step", "key") + tuple(p for p in specs if p.endswith("count")):
    assert specs[path] == P(), path
  assert sum(p.endswith("count") for p in specs) >= 1

  # Created sharded, and a jitted update with those out_shardings keeps them.
  params = jax.device_put(host, parallel.param_shardings(host, mesh, LM_SHARDING_RULES))
  state = jax.jit(create, out_shardings=shardings)(params)
  tokens = jax.device_put(
      np.random.default_rng(1).integers(0, TINY.vocab_size, (4, 8)).astype(np.int32),
      parallel.batch_sharding(mesh),
  )

  def update(state, tokens):
    def loss(p):
      valid = jnp.ones(tokens.shape, bool)
      return -jnp.mean(scoring.score(graphdef, p, tokens, valid, valid).sums)

    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads, optimizer), value

  step = jax.jit(update, out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  new, loss0 = step(state, tokens)
  new, loss1 = step(new, tokens)
  assert float(loss1) < float(loss0)
  for (path, leaf), want in zip(
      parallel.flatten_with_paths(new)[0], jax.tree.leaves(shardings), strict=True
  ):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
  q = new.opt_state[1][0].mu["layers"][0]["attn"]["q"]["kernel"][...]
  assert q.addressable_shards[0].data.shape == (32 // shape[1], 4 // shape[2], 8)


def test_kv_heads_the_tensor_axis_does_not_divide_are_replicated(caplog):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})  # 2 KV heads over tensor=4
  _, host = tiny_params()
  abstract = jax.eval_shape(
      lambda p: TrainState.create(p, optax.adamw(1e-3), jax.random.key(0)), host
  )
  with caplog.at_level(logging.INFO, logger="alignjax.parallel"):
    shardings = parallel.param_shardings(abstract, mesh, LM_SHARDING_RULES)
  sh = shardings.params["layers"][1]["attn"]
  assert sh["k"]["kernel"].get_value().spec == P("fsdp", None, None)
  assert sh["q"]["kernel"].get_value().spec == P("fsdp", "tensor", None)
  nu = shardings.opt_state[0].nu["layers"][1]["attn"]["v"]["kernel"].get_value()
  assert nu.spec == P("fsdp", None, None)
  # 2 layers x (k, v) x (param, mu, nu) = 12 replicated dimensions, in one log line
  assert "replicated 12 dimension(s)" in caplog.text and "dimension 1 of size 2" in caplog.text
  # The engine's default for a hand-written rule is to refuse.
  with pytest.raises(parallel.ShardingError, match="not divisible.*indivisible='replicate'"):
    parallel.param_shardings(abstract, mesh, [(r"attn/k/kernel$", ("fsdp", "tensor"))])
