"""The LM forward pass on a data=2 x fsdp=2 x tensor=2 mesh of 8 CPU devices equals the
single-device result, with parameters loaded straight into their shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import parallel
from alignjax.models.convert import abstract_lm, load_hf_lm, read_hf_config
from alignjax.models.lm import (
    LM_SHARDING_RULES,
    forward,
    lm_param_shardings,
    lm_sharding_rules,
    spec_for,
)
from test_lm_hf_models import hf_checkpoint, left_padded_batch


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


def test_param_shardings_tree_and_fallback():
  mesh = mesh8()
  _, abstract = abstract_lm(read_hf_config(hf_checkpoint("llama")))
  shardings = lm_param_shardings(abstract, mesh)
  spec = lambda v: v.get_value().spec
  assert spec(shardings["layers"][1]["attn"]["o"]["kernel"]) == P("tensor", None, "fsdp")
  assert spec(shardings["layers"][1]["mlp"]["down"]["kernel"]) == P("tensor", "fsdp")
  assert spec(shardings["final_norm"]["scale"]) == P(None)
  # An axis the mesh does not divide is replicated rather than failing.
  assert spec_for("embed/embedding", (127, 64), mesh) == P(None, "fsdp")
  # FSDP over both data-parallel axes (ZeRO-3 style).
  rules = lm_sharding_rules(fsdp=("data", "fsdp"))
  assert spec_for("layers/0/mlp/up/kernel", (64, 96), mesh, rules) == P(("data", "fsdp"), "tensor")
  with pytest.raises(ValueError, match="no sharding rule matches parameter foo"):
    spec_for("foo", (3,), mesh, LM_SHARDING_RULES[:-1])
  # The rules mean the same under alignjax.parallel (re.search) for divisible shapes.
  theirs = parallel.param_shardings(abstract, mesh, LM_SHARDING_RULES)
  for a, b, x in zip(
      jax.tree.leaves(theirs), jax.tree.leaves(shardings), jax.tree.leaves(abstract)
  ):
    assert a.is_equivalent_to(b, x.ndim)
  gpt2 = lm_param_shardings(abstract_lm(read_hf_config(hf_checkpoint("gpt2")))[1], mesh)
  assert spec(gpt2["pos_embed"]["embedding"]) == P(None, "fsdp")
