"""Tests of the class-conditional digits UNet (alignjax.models.unet)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax import testing
from alignjax.models import io
from alignjax.models import unet as unet_lib


def _np_group_norm(x, scale, bias, groups, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


def _np_conv_same(x, kernel, bias):
  """Stride-1 'SAME' cross-correlation, written out with loops over the kernel taps."""
  kh, kw, _, cout = kernel.shape
  b, h, w, _ = x.shape
  ph, pw = kh // 2, kw // 2
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  out = np.zeros((b, h, w, cout))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,cd->bhwd", xp[:, i : i + h, j : j + w, :], kernel[i, j])
  return out + bias


def _np(v):
  return np.asarray(v, np.float64)


# One compiled forward shared by the tests (same tiny structure -> compiled once per shape).
_apply = nnx.jit(lambda model, x, t, c: model(x, t, c))


def test_timestep_embedding_matches_formula():
  t = jnp.array([0, 1, 17, 999], jnp.int32)
  got = np.asarray(unet_lib.timestep_embedding(t, 8, 10000.0))
  freqs = [math.exp(-math.log(10000.0) * i / 4) for i in range(4)]  # eq. 1
  want = [
      [math.cos(tt * f) for f in freqs] + [math.sin(tt * f) for f in freqs]
      for tt in [0, 1, 17, 999]
  ]  # eq. 2
  np.testing.assert_allclose(got, want, atol=2e-4)


def test_resblock_matches_numpy():
  block = testing.host_init(lambda rngs: unet_lib.ResBlock(4, 8, 6, 2, rngs=rngs), seed=3)
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
  emb = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
  got = np.asarray(block(jnp.asarray(x), jnp.asarray(emb)))
  p = jax.tree.map(_np, nnx.to_pure_dict(nnx.state(block)))
  h = _np_conv_same(
      _np_silu(_np_group_norm(_np(x), p["norm1"]["scale"], p["norm1"]["bias"], 2)),
      p["conv1"]["kernel"],
      p["conv1"]["bias"],
  )
  h = h + (_np_silu(_np(emb)) @ p["emb_proj"]["kernel"] + p["emb_proj"]["bias"])[:, None, None]
  h = _np_conv_same(
      _np_silu(_np_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"], 2)),
      p["conv2"]["kernel"],
      p["conv2"]["bias"],
  )
  skip = _np(x) @ p["skip"]["kernel"][0, 0] + p["skip"]["bias"]
  np.testing.assert_allclose(got, skip + h, rtol=1e-4, atol=1e-4)  # eqs. 4-5


def test_attention_block_matches_numpy():
  block = testing.host_init(lambda rngs: unet_lib.AttentionBlock(8, 2, 4, rngs=rngs), seed=1)
  x = np.random.default_rng(0).normal(size=(3, 2, 2, 8)).astype(np.float32)
  got = np.asarray(block(jnp.asarray(x)))
  p = jax.tree.map(_np, nnx.to_pure_dict(nnx.state(block)))
  hn = _np_group_norm(_np(x), p["norm"]["scale"], p["norm"]["bias"], 4).reshape(3, 4, 8)
  qkv = hn @ p["qkv"]["kernel"] + p["qkv"]["bias"]  # [B, L, 3C] laid out as (3, heads, d)
  out = np.zeros((3, 4, 8))
  for b in range(3):
    for head in range(2):
      sl = lambda k: qkv[b, :, k * 8 + head * 4 : k * 8 + head * 4 + 4]
      q, k, v = sl(0), sl(1), sl(2)
      logits = q @ k.T / 2.0
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[b, :, head * 4 : (head + 1) * 4] = w @ v
  want = _np(x) + (out @ p["out"]["kernel"] + p["out"]["bias"]).reshape(3, 2, 2, 8)  # eq. 6
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_default_unet_size_structure_and_zero_output_conv():
  cfg = unet_lib.UNetConfig()
  abstract = nnx.eval_shape(lambda: unet_lib.UNet(cfg, rngs=nnx.Rngs(0)))
  n = unet_lib.param_count(abstract)
  assert 300_000 <= n <= 1_200_000, n
  # Three resolution levels (8 -> 4 -> 2) and attention at the lowest one in the down path.
  assert sum(isinstance(b, unet_lib.Downsample) for b in abstract.down) == len(cfg.channels) - 1
  assert sum(isinstance(b, unet_lib.Upsample) for b in abstract.up) == len(cfg.channels) - 1
  assert sum(isinstance(b, unet_lib.AttentionBlock) for b in abstract.down) == 1
  assert abstract.class_embed.embedding.shape == (11, cfg.embed_dim)  # + null row
  # conv_out is zero-initialised, so the initial prediction is exactly 0 (XLA drops the
  # unused initialisers of the other parameters, so this compiles quickly).
  conv_out = jax.jit(lambda: nnx.state(unet_lib.UNet(cfg, rngs=nnx.Rngs(0)))["conv_out"])()
  assert not np.any(np.asarray(conv_out["kernel"][...])) and not np.any(
      np.asarray(conv_out["bias"][...])
  )


def test_full_size_unet_eval_shape():
  cfg = unet_lib.UNetConfig(channels=(64, 128, 256), num_res_blocks=2)
  abstract = nnx.eval_shape(lambda: unet_lib.UNet(cfg, rngs=nnx.Rngs(0)))
  out = jax.eval_shape(
      lambda m: m(
          jnp.zeros((16, 8, 8, 1)), jnp.zeros((16,), jnp.int32), jnp.zeros((16,), jnp.int32)
      ),
      abstract,
  )
  assert out.shape == (16, 8, 8, 1)


def test_examples_are_independent_of_the_batch():
  model = testing.tiny_unet(seed=1, config=testing.TWO_LEVEL_UNET_CONFIG)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 8, 8, 1)), jnp.float32)
  t = jnp.array([3, 100, 250, 700, 999], jnp.int32)
  c = jnp.array([0, 4, 9, 10, 2], jnp.int32)
  full = np.asarray(_apply(model, x, t, c))
  for i in (0, 3):
    single = np.asarray(_apply(model, x[i : i + 1], t[i : i + 1], c[i : i + 1]))
    np.testing.assert_allclose(single[0], full[i], rtol=1e-5, atol=1e-5)


def test_output_depends_on_time_class_and_input():
  model = testing.tiny_unet(seed=0, config=testing.TWO_LEVEL_UNET_CONFIG)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8, 8, 1)), jnp.float32)
  t = jnp.full((5,), 100, jnp.int32)
  c = jnp.full((5,), 1, jnp.int32)
  base = np.asarray(_apply(model, x, t, c))
  assert not np.allclose(base, np.asarray(_apply(model, x, t + 400, c)))
  assert not np.allclose(base, np.asarray(_apply(model, x, t, c + 9)))  # null id
  assert not np.allclose(base, np.asarray(_apply(model, x * 0.5, t, c)))
  # A scalar t broadcasts over the batch.
  np.testing.assert_allclose(np.asarray(_apply(model, x, jnp.int32(100), c)), base, atol=1e-6)


def test_jit_grad_reaches_every_parameter():
  model = testing.tiny_unet(seed=0, config=testing.TWO_LEVEL_UNET_CONFIG)
  graphdef, params = nnx.split(model)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 8, 8, 1)), jnp.float32)
  t = jnp.array([1, 500, 999], jnp.int32)
  c = jnp.array([0, 5, 10], jnp.int32)

  @jax.jit
  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x, t, c) ** 2)

  grads = jax.grad(loss)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    if "class_embed" not in jax.tree_util.keystr(path):  # only 3 of 11 rows are used
      assert np.abs(g).max() > 0, path


def test_config_round_trip_and_unknown_fields():
  cfg = unet_lib.UNetConfig(channels=(16, 32), attention_resolutions=(4,), num_heads=2)
  d = cfg.to_dict()
  assert d["channels"] == [16, 32]  # JSON-ready
  assert unet_lib.UNetConfig.from_dict(d) == cfg
  with pytest.raises(ValueError, match=r"unknown config field.*\['bogus', 'widths'\]"):
    unet_lib.UNetConfig.from_dict({**d, "widths": 3, "bogus": 1})
  with pytest.raises(io.ModelIOError):
    unet_lib.UNetConfig.from_dict({"bogus": 1})


def test_bad_config_and_inputs_raise():
  with pytest.raises(ValueError, match="divisible"):
    unet_lib.UNetConfig(channels=(30, 60))
  with pytest.raises(ValueError, match="image_size"):
    unet_lib.UNetConfig(image_size=6, channels=(8, 8, 8), num_groups=4, num_heads=2)
  model = testing.tiny_unet()
  with pytest.raises(ValueError, match=r"expected \[B, 8, 8, 1\]"):
    model(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="must have shape"):
    model(jnp.zeros((2, 8, 8, 1)), jnp.zeros((3,), jnp.int32), jnp.zeros((2,), jnp.int32))
