"""Tests of functional LoRA (alignjax.models.lora)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import testing
from alignjax.models import lora
from alignjax.models.lm import TransformerLM
from alignjax.models.lm_config import LMConfig
from alignjax.models.lm_layers import dense_product


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
  # A is PEFT's Kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (eq. 3); B is zero.
  a = lp["time_mlp2/kernel"]["a"]
  assert a.shape == (16, 2) and float(jnp.abs(a).max()) <= 1.0 / 4.0
  conv = np.asarray(lp["down/0/conv1/kernel"]["a"])  # a conv kernel [3, 3, in, out]
  fan_in = conv.shape[0]
  assert float(np.abs(conv).max()) <= 1 / np.sqrt(fan_in) and conv.shape[1] == 2
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


# --- LoRA on the LM's Dense kernels, over their real input axes -------------------------------

H, N, K, D, F = 16, 2, 1, 8, 24
TINY_LM = LMConfig(
    family="llama",
    vocab_size=32,
    hidden_size=H,
    num_layers=2,
    num_heads=N,
    num_kv_heads=K,
    head_dim=D,
    mlp_dim=F,
    max_position_embeddings=32,
)


@functools.lru_cache(maxsize=None)
def _lm(config=TINY_LM):
  return TransformerLM(config, rngs=nnx.Rngs(0))


def _flat(params):
  return {
      lora.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def test_dense_num_in_reads_the_lm_layers():
  num_in = lora.dense_num_in(_lm())
  assert num_in["layers/0/attn/q/kernel"] == 1 and num_in["layers/1/attn/o/kernel"] == 2
  assert num_in["layers/0/mlp/down/kernel"] == 1 and num_in["lm_head/kernel"] == 1
  assert len(num_in) == 2 * 7 + 1
  # The paths are the parameter paths of the model's state.
  assert set(num_in) <= set(_flat(nnx.state(_lm(), nnx.Param)))


def test_lm_param_count_uses_real_in_and_out_axes():
  r = 3
  lp = lora.init_lm_lora(_lm(), r, jax.random.key(0))
  assert set(lp) == {
      f"layers/{i}/{m}/kernel"
      for i in range(2)
      for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
  }
  assert lp["layers/0/attn/q/kernel"]["a"].shape == (H, r)
  assert lp["layers/0/attn/q/kernel"]["b"].shape == (r, N * D)
  assert lp["layers/0/attn/o/kernel"]["a"].shape == (N * D, r)
  assert lp["layers/0/attn/o/kernel"]["b"].shape == (r, H)
  per_layer = (
      r * (H + N * D)  # q
      + 2 * r * (H + K * D)  # k, v
      + r * (N * D + H)  # o
      + 2 * r * (H + F)  # gate, up
      + r * (F + H)  # down
  )
  assert lora.lora_param_count(lp) == 2 * per_layer
  only_q = lora.init_lm_lora(_lm(), r, jax.random.key(0), modules=("q", "lm_head"))
  assert lora.lora_param_count(only_q) == 2 * r * (H + N * D) + r * (H + 32)


def test_lm_merged_kernel_matches_numpy_and_dense_forward():
  r, alpha = 2, 5.0
  model = _lm()
  params = nnx.state(model, nnx.Param)
  lp = lora.init_lm_lora(model, r, jax.random.key(1), modules=("q", "o"))
  rng = np.random.default_rng(0)
  lp = {
      k: {"a": v["a"], "b": jnp.asarray(rng.normal(size=v["b"].shape), jnp.float32)}
      for k, v in lp.items()
  }
  merged = _flat(lora.merge_lora(params, lp, alpha=alpha))
  base = _flat(params)
  for name, (fan_in, shape) in {
      "layers/0/attn/q/kernel": (H, (H, N, D)),
      "layers/1/attn/o/kernel": (N * D, (N, D, H)),
  }.items():
    a, b = (np.asarray(lp[name][x], np.float64) for x in "ab")
    assert base[name].shape == shape and a.shape[0] == fan_in
    want = base[name] + alpha / r * (a @ b).reshape(shape)  # eq. 2
    np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["layers/0/attn/k/kernel"], base["layers/0/attn/k/kernel"])
  # The merged o layer computes o(x) + s (x_flat A) B over its [N, D] input (eq. 2).
  name = "layers/0/attn/o/kernel"
  x = rng.normal(size=(3, N, D)).astype(np.float32)
  a, b = np.asarray(lp[name]["a"]), np.asarray(lp[name]["b"])
  want = np.tensordot(x, base[name], axes=2) + alpha / r * (x.reshape(3, N * D) @ a) @ b
  got = dense_product(jnp.asarray(x), jnp.asarray(merged[name]), 2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  # rsLoRA scale alpha / sqrt(r).
  rs = _flat(lora.merge_lora(params, lp, alpha=alpha, rslora=True))
  a, b = (np.asarray(lp[name][x], np.float64) for x in "ab")
  want = base[name] + alpha / np.sqrt(r) * (a @ b).reshape(base[name].shape)
  np.testing.assert_allclose(rs[name], want, rtol=1e-5, atol=1e-5)
  assert lora.lora_scale(4, 8.0) == 2.0 and lora.lora_scale(4, 8.0, rslora=True) == 4.0
  assert lora.lora_scale(4) == 1.0


def test_init_matches_peft_distributions():
  model = _lm()
  params = nnx.state(model, nnx.Param)
  r = 8
  lp = lora.init_lm_lora(model, r, jax.random.key(2), modules=("o", "down"))
  for name, fan_in in (("layers/0/attn/o/kernel", N * D), ("layers/0/mlp/down/kernel", F)):
    a = np.asarray(lp[name]["a"])
    bound = 1 / np.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, fan_in]
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.25)
    assert not np.asarray(lp[name]["b"]).any()
  for x, y in zip(
      jax.tree.leaves(params), jax.tree.leaves(lora.merge_lora(params, lp, alpha=16.0))
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  g = lora.init_lm_lora(model, r, jax.random.key(3), init="gaussian")
  a = np.concatenate([np.asarray(v["a"]).ravel() for v in g.values()])
  np.testing.assert_allclose(a.std(), 1 / r, rtol=0.1)  # nn.init.normal_(std=1/r)
  assert abs(a.mean()) < 0.1 / r and not any(np.asarray(v["b"]).any() for v in g.values())


def test_num_in_forms_and_bad_input():
  params = {"w": {"kernel": jnp.ones((2, 3, 4))}}
  key = jax.random.key(0)
  assert lora.init_lora(params, 2, key)["w/kernel"]["a"].shape == (6, 2)  # default: all but last
  assert lora.init_lora(params, 2, key, num_in=1)["w/kernel"]["a"].shape == (2, 2)
  assert lora.init_lora(params, 2, key, num_in={"w/kernel": 1})["w/kernel"]["b"].shape == (2, 12)
  assert lora.init_lora(params, 2, key, num_in=lambda p, s: 2)["w/kernel"]["b"].shape == (2, 4)
  with pytest.raises(ValueError, match="no entry for target 'w/kernel'"):
    lora.init_lora(params, 2, key, num_in={"other/kernel": 1})
  with pytest.raises(ValueError, match=r"num_in=3 .* need an int in \[1, 2\]"):
    lora.init_lora(params, 2, key, num_in=3)
  with pytest.raises(TypeError, match="num_in"):
    lora.init_lora(params, 2, key, num_in="1")
  with pytest.raises(ValueError, match=r"init='xavier'; valid choices: \('kaiming', 'gaussian'\)"):
    lora.init_lora(params, 2, key, init="xavier")
  with pytest.raises(ValueError, match="unknown module names \\['qq'\\]; valid:"):
    lora.init_lm_lora(_lm(), 2, key, modules=("q", "qq"))
  gpt2 = dataclasses.replace(
      TINY_LM,
      family="gpt2",
      gated_mlp=False,
      norm="layer",
      activation="gelu_tanh",
      tie_embeddings=True,
      position_embedding="learned",
      num_kv_heads=N,
  )
  with pytest.raises(ValueError, match=r"\['gate', 'lm_head'\] select no kernel.*available"):
    lora.init_lm_lora(_lm(gpt2), 2, key, modules=("q", "gate", "lm_head"))
  # A merged kernel split by the factors must be a real [in..., out...] split.
  lp = lora.init_lora(params, 2, key, num_in=1)
  lora.merge_lora(params, lp)
  bad = {"w/kernel": {"a": jnp.zeros((4, 2)), "b": jnp.zeros((2, 6))}}
  with pytest.raises(ValueError, match=r"do not fit kernel \(2, 3, 4\)"):
    lora.merge_lora(params, bad)
