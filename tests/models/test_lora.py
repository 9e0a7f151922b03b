"""Tests of functional LoRA (alignjax.models.lora)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import testing
from alignjax.models import lora


def _params(seed=0):
  return nnx.split(testing.tiny_unet(seed))[1]


def test_targets_are_linear_and_conv_kernels():
  params = _params()
  targets = lora.lora_targets(params)
  assert "conv_in/kernel" in targets and "time_mlp1/kernel" in targets
  assert all(name.endswith("kernel") and len(shape) >= 2 for name, shape in targets.items())
  assert not any("class_embed" in n or "norm" in n for n in targets)
  conv = lora.lora_targets(params, target=r"conv\d?/kernel$")
  assert conv and all(len(s) == 4 for s in conv.values())
  with pytest.raises(ValueError, match="matches no parameter"):
    lora.init_lora(params, 2, jax.random.key(0), target="nothing_here")
  with pytest.raises(ValueError, match="rank"):
    lora.init_lora(params, 0, jax.random.key(0))


def test_initial_merge_is_exactly_the_base_and_count():
  params = _params()
  lp = lora.init_lora(params, 2, jax.random.key(1))
  merged = lora.merge_lora(params, lp, alpha=8.0)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  expected = sum(2 * (int(np.prod(s[:-1])) + s[-1]) for s in lora.lora_targets(params).values())
  assert lora.lora_param_count(lp) == expected
  # A has the N(0, 1/fan_in) scale; B is zero.
  a = lp["time_mlp2/kernel"]["a"]
  assert a.shape == (16, 2) and 0.3 < float(jnp.std(a)) * 4.0 < 2.0
  assert not np.any(np.asarray(lp["time_mlp2/kernel"]["b"]))


def test_merged_kernel_matches_numpy():
  params = _params()
  lp = lora.init_lora(params, 2, jax.random.key(2))
  rng = np.random.default_rng(0)
  lp = {
      k: {"a": v["a"], "b": jnp.asarray(rng.normal(size=v["b"].shape), jnp.float32)}
      for k, v in lp.items()
  }
  merged = lora.merge_lora(params, lp, alpha=6.0)
  flat_base = {
      lora.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  flat_merged = {
      lora.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(merged)[0]
  }
  for name in ("conv_in/kernel", "down/0/conv1/kernel", "time_mlp1/kernel"):
    w = flat_base[name].astype(np.float64)
    a = np.asarray(lp[name]["a"], np.float64)
    b = np.asarray(lp[name]["b"], np.float64)
    want = w + (6.0 / 2) * (a @ b).reshape(w.shape)  # eq. 1 with [kh*kw*in, out] rows
    np.testing.assert_allclose(flat_merged[name], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      flat_merged["class_embed/embedding"], flat_base["class_embed/embedding"]
  )
  # alpha=None means scale 1.
  merged1 = lora.merge_lora(params, lp)
  w = flat_base["conv_in/kernel"]
  want = w + (
      np.asarray(lp["conv_in/kernel"]["a"]) @ np.asarray(lp["conv_in/kernel"]["b"])
  ).reshape(w.shape)
  np.testing.assert_allclose(
      np.asarray(merged1["conv_in"]["kernel"][...]), want, rtol=1e-5, atol=1e-5
  )


def test_gradients_reach_lora_only_and_merge_is_jittable():
  model = testing.tiny_classifier(0)  # conv and linear kernels, cheap to compile
  graphdef, params = nnx.split(model)
  lp = lora.init_lora(params, 2, jax.random.key(3))
  assert {"conv1/kernel", "conv3/kernel", "fc1/kernel", "fc2/kernel"} <= set(lp)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 8, 8, 1)), jnp.float32)

  def loss(lp, base):
    return jnp.sum(lora.merged_model(graphdef, base, lp, alpha=4.0)(x)[:, 3])

  grad_fn = jax.jit(jax.grad(loss))  # w.r.t. the LoRA factors only; the base is an input
  g_lora = grad_fn(lp, params)
  assert jax.tree.structure(g_lora) == jax.tree.structure(lp)
  # B starts at 0, so dL/dB = A^T dL/dW' != 0 while dL/dA = dL/dW' B^T = 0 at init.
  assert all(float(jnp.abs(v["b"]).max()) > 0 for v in g_lora.values())
  assert all(float(jnp.abs(v["a"]).max()) == 0 for v in g_lora.values())
  # With B != 0 both factors get gradients; dL/dB matches (alpha/r) A^T dL/dW' (eq. 1).
  lp2 = jax.tree.map(lambda v: v + 0.1, lp)
  g2 = grad_fn(lp2, params)
  assert all(float(jnp.abs(v["a"]).max()) > 0 for v in g2.values())
  merged = lora.merge_lora(params, lp2, alpha=4.0)
  g_w = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[:, 3]))(merged)
  g_fc2 = np.asarray(g_w["fc2"]["kernel"][...])
  np.testing.assert_allclose(
      np.asarray(g2["fc2/kernel"]["b"]),
      2.0 * np.asarray(lp2["fc2/kernel"]["a"]).T @ g_fc2,
      rtol=1e-4,
      atol=1e-6,
  )
  # The base is an input, not something the merge modifies.
  before = jax.tree.map(np.asarray, params)
  lora.merge_lora(params, lp2)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_merge_rejects_mismatched_entries():
  params = _params()
  lp = lora.init_lora(params, 2, jax.random.key(0))
  with pytest.raises(ValueError, match="name no base parameter"):
    lora.merge_lora(params, {**lp, "missing/kernel": lp["conv_in/kernel"]})
  bad = dict(lp)
  bad["conv_in/kernel"] = {"a": jnp.zeros((5, 2)), "b": jnp.zeros((2, 8))}
  with pytest.raises(ValueError, match="do not fit kernel"):
    lora.merge_lora(params, bad)


def test_works_on_plain_dicts():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}}
  lp = lora.init_lora(params, 2, jax.random.key(0))
  assert set(lp) == {"dense/kernel"}
  lp = {"dense/kernel": {"a": jnp.array([[1.0], [2.0], [3.0]]), "b": jnp.array([[1.0, -1.0]])}}
  merged = lora.merge_lora(params, lp, alpha=2.0)
  np.testing.assert_allclose(
      merged["dense"]["kernel"], 1.0 + 2.0 * np.array([[1, -1], [2, -2], [3, -3]])
  )
