"""Tests of alignjax.lm.scoring: chunked == plain == a naive log-softmax, and less memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax.lm import scoring
from alignjax.models.convert import pad_left
from alignjax.models.lm import TransformerLM, forward
from alignjax.models.lm_config import LMConfig

FWD = jax.jit(forward, static_argnums=0)
CONFIG = LMConfig(
    family="llama",
    vocab_size=300,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=24,
    max_position_embeddings=64,
)


def make(config, seed=0):
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(seed))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if path[-2].key == "scale" else 0.0
    return jnp.asarray(base + 0.5 * rng.normal(size=x.shape), x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


def batch(vocab):
  rng = np.random.default_rng(1)
  seqs = [list(rng.integers(0, vocab, size=n)) for n in (13, 6, 9)]
  tokens, valid = pad_left(seqs, max_length=64)
  prompt_lens = (5, 2, 4)
  mask = np.zeros_like(valid)
  for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
    mask[b, tokens.shape[1] - len(s) + p :] = True  # the response: after the prompt
  return tokens, valid, mask, seqs, prompt_lens


@pytest.mark.parametrize("variant", ["untied", "tied_softcap"])
def test_chunked_equals_plain_equals_naive(variant):
  config = (
      CONFIG
      if variant == "untied"
      else dataclasses.replace(
          CONFIG, family="gemma2", tie_embeddings=True, final_logit_softcap=3.0
      )
  )
  graphdef, params = make(config)
  tokens, valid, mask, seqs, prompt_lens = batch(config.vocab_size)
  fn = jax.jit(scoring.score, static_argnums=0, static_argnames=("seq_chunk", "vocab_chunk"))
  plain = fn(graphdef, params, tokens, valid, mask)
  chunked = fn(graphdef, params, tokens, valid, mask, seq_chunk=5, vocab_chunk=64)
  vocab_only = fn(graphdef, params, tokens, valid, mask, vocab_chunk=128)
  for out in (chunked, vocab_only):
    np.testing.assert_allclose(out.log_probs, plain.log_probs, atol=1e-5)
    np.testing.assert_allclose(out.sums, plain.sums, atol=1e-5)
  # Naive: unpadded full forward, float64 log-softmax of the logits predicting each token.
  width, lp_first = tokens.shape[1], []
  for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
    padded = jnp.asarray([list(s) + [0] * (16 - len(s))], jnp.int32)  # causal: prefix exact
    z = np.asarray(FWD(graphdef, params, padded)[0][0], np.float64)[: len(s)]
    lp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    lp_first.append(lp[0, s[1]])
    want = [lp[t - 1, s[t]] for t in range(p, len(s))]
    got = np.asarray(chunked.log_probs[b, width - len(s) + p :])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(chunked.sums[b], sum(want), atol=1e-4)
    assert (np.asarray(chunked.log_probs[b, : width - len(s) + p]) == 0).all()
  # The first real token of a row has no prediction: never scored, even when masked.
  first = jax.jit(scoring.score, static_argnums=0)(graphdef, params, tokens, valid, valid)
  for b, s in enumerate(seqs):
    assert float(first.log_probs[b, width - len(s)]) == 0.0
    np.testing.assert_allclose(first.log_probs[b, width - len(s) + 1], lp_first[b], atol=1e-5)


def test_chunked_uses_less_temporary_memory():
  config = dataclasses.replace(
      CONFIG, vocab_size=16384, hidden_size=8, num_heads=1, head_dim=8, mlp_dim=8
  )
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0))))
  tokens = jax.ShapeDtypeStruct((4, 64), jnp.int32)
  valid = jax.ShapeDtypeStruct((4, 64), jnp.bool_)

  def temp_bytes(**chunks):
    fn = jax.jit(lambda p, t, v: scoring.score(graphdef, p, t, v, v, **chunks).sums)
    return fn.lower(abstract, tokens, valid).compile().memory_analysis().temp_size_in_bytes

  plain, chunked = temp_bytes(), temp_bytes(seq_chunk=16, vocab_chunk=1024)
  print(
      f"score temp bytes: plain {plain:,}, chunked {chunked:,} "
      f"(full logits {4 * 63 * 16384 * 4:,})"
  )
  assert chunked * 4 < plain


def test_bad_inputs():
  graphdef, params = make(CONFIG)
  t = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(ValueError, match="must all be"):
    scoring.score(graphdef, params, t, t > 0, jnp.zeros((2, 4), bool))
  with pytest.raises(ValueError, match="vocab_chunk=0"):
    scoring.score(graphdef, params, t, t == 0, t == 0, vocab_chunk=0)


@pytest.mark.parametrize("variant", ["untied", "tied_softcap"])
def test_chunked_gradients_equal_plain_gradients(variant):
  """d/dθ of a weighted sum of sequence log-probs, w.r.t. every parameter (float32)."""
  config = (
      CONFIG
      if variant == "untied"
      else dataclasses.replace(
          CONFIG, family="gemma2", tie_embeddings=True, final_logit_softcap=3.0
      )
  )
  graphdef, params = make(config)
  tokens, valid, mask, _, _ = batch(config.vocab_size)
  tokens, valid, mask = (x[:, -16:] for x in (tokens, valid, mask))  # rows fit in 16 slots
  weights = jnp.asarray([0.7, -1.3, 0.4])

  def loss(p, **chunks):
    return jnp.sum(weights * scoring.score(graphdef, p, tokens, valid, mask, **chunks).sums)

  grad = jax.jit(jax.grad(loss), static_argnames=("seq_chunk", "vocab_chunk"))
  plain, chunked = grad(params), grad(params, seq_chunk=5, vocab_chunk=64)
  leaves = jax.tree_util.tree_leaves_with_path(plain)
  assert len(leaves) == len(jax.tree.leaves(params)) > 5
  scale = max(float(jnp.max(jnp.abs(a))) for _, a in leaves)
  print(f"largest |gradient| {scale:.3g}")
  for (path, a), b in zip(leaves, jax.tree.leaves(chunked), strict=True):
    assert float(jnp.max(jnp.abs(a))) > 0, path  # every parameter gets a gradient
    # float32: 2e-6 of the largest gradient (sums are accumulated in another order; each
    # path is ~6e-6 of it from the float64 gradient, and 1e-6 is just missed at one entry)
    np.testing.assert_allclose(b, a, atol=2e-6 * scale, rtol=0, err_msg=str(path))


@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_head_gradients_equal_finite_differences_in_float64(cap):
  """Under x64, `token_log_probs` runs in float64; its reverse-mode gradients w.r.t. the
  hidden states and the output matrix match central differences along random directions."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float64)
    w = jnp.asarray(rng.normal(size=(5, 23)), jnp.float64)
    y = jnp.asarray(rng.integers(0, 23, size=(2, 7)), jnp.int32)
    c = jnp.asarray(rng.normal(size=(2, 7)), jnp.float64)

    def f(h, w):
      lp = scoring.token_log_probs(h, y, w, cap, seq_chunk=3, vocab_chunk=6)  # ragged chunks
      return jnp.sum(c * lp)

    assert f(h, w).dtype == jnp.float64
    full = scoring.token_log_probs(h, y, w, cap)
    np.testing.assert_allclose(
        scoring.token_log_probs(h, y, w, cap, vocab_chunk=6), full, atol=1e-13
    )
    z = np.asarray(h) @ np.asarray(w)
    z = z if cap is None else cap * np.tanh(z / cap)
    naive = np.take_along_axis(z, np.asarray(y)[..., None], -1)[..., 0] - np.logaddexp.reduce(z, -1)
    np.testing.assert_allclose(full, naive, atol=1e-12)
    gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(h, w)
    f = jax.jit(f)
    eps = 1e-5
    for _ in range(3):
      dh, dw = rng.normal(size=h.shape), rng.normal(size=w.shape)
      fd = (f(h + eps * dh, w + eps * dw) - f(h - eps * dh, w - eps * dw)) / (2 * eps)
      np.testing.assert_allclose(
          float(jnp.sum(gh * dh) + jnp.sum(gw * dw)), float(fd), rtol=1e-7, atol=1e-9
      )


@pytest.mark.parametrize("cap", [None, 3.0])
def test_full_vocab_gradient_equals_autodiff_of_log_softmax(cap):
  """The plain path's written-out gradient (eq. 5) equals reverse-mode autodiff of the
  textbook log_softmax + gather: tightly in float64, to float32 rounding in float32."""

  def naive(h, w, y):
    z = jnp.einsum("bsh,hv->bsv", h, w)
    z = z if cap is None else cap * jnp.tanh(z / cap)
    return jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), y[..., None], axis=-1)[..., 0]

  rng = np.random.default_rng(4)
  h0, w0 = rng.normal(size=(3, 7, 5)), rng.normal(size=(5, 23))
  y = jnp.asarray(rng.integers(0, 23, size=(3, 7)), jnp.int32)
  c0 = rng.normal(size=(3, 7))
  for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 2e-6)):
    with jax.enable_x64(dtype == jnp.float64):
      h, w, c = (jnp.asarray(x, dtype) for x in (h0, w0, c0))
      got = jax.jit(
          jax.value_and_grad(
              lambda h, w: jnp.sum(c * scoring.token_log_probs(h, y, w, cap)), argnums=(0, 1)
          )
      )(h, w)
      want = jax.jit(jax.value_and_grad(lambda h, w: jnp.sum(c * naive(h, w, y)), argnums=(0, 1)))(
          h, w
      )
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(jnp.max(jnp.abs(b)))))


@pytest.mark.parametrize("chunks", [{}, {"seq_chunk": 3, "vocab_chunk": 64}])
def test_start_skips_the_slots_before_it(chunks):
  """score(start=k) == score with the mask cleared before slot k: log-probs, sums and the
  gradient of a weighted sum; slots before k score 0 even where masked."""
  graphdef, params = make(CONFIG)
  tokens, valid, mask, _, _ = batch(CONFIG.vocab_size)
  tokens, valid, mask = (jnp.asarray(x) for x in (tokens, valid, mask))
  width = tokens.shape[1]
  weights = jnp.asarray([0.7, -1.3, 0.4])
  fn = jax.jit(
      scoring.score, static_argnums=0, static_argnames=("seq_chunk", "vocab_chunk", "start")
  )

  def loss(p, m, **kw):
    return jnp.sum(weights * scoring.score(graphdef, p, tokens, valid, m, **chunks, **kw).sums)

  grad = jax.jit(jax.grad(loss), static_argnames="start")
  for start in (0, 1, 9, width - 1):
    cleared = mask & (jnp.arange(width) >= start)
    want = fn(graphdef, params, tokens, valid, cleared, **chunks)
    got = fn(graphdef, params, tokens, valid, valid, start=start, **chunks)  # all masked
    got_masked = fn(graphdef, params, tokens, valid, cleared, start=start, **chunks)
    np.testing.assert_allclose(got_masked.log_probs, want.log_probs, atol=1e-6)
    np.testing.assert_allclose(got_masked.sums, want.sums, atol=1e-5)
    assert (np.asarray(got.log_probs[:, :start]) == 0).all()
    assert float(jnp.sum(jnp.abs(got_masked.sums))) > 0
    np.testing.assert_allclose(
        got.log_probs[:, start:][cleared[:, start:]],
        want.log_probs[:, start:][cleared[:, start:]],
        atol=1e-6,
    )
    g_want, g_got = grad(params, cleared), grad(params, cleared, start=start)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_want))
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
      np.testing.assert_allclose(a, b, atol=2e-6 * scale, rtol=0)
  with pytest.raises(ValueError, match=f"start={width}"):
    scoring.score(graphdef, params, tokens, valid, mask, start=width)
