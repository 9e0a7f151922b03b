r"""Teacher-forced log-probabilities of given continuations under a `TransformerLM`.

A batch holds left-padded sequences `tokens` [B, L] (prompt followed by response, `valid`
marking real tokens) and `mask` [B, L] marking the tokens to score (usually the response).
With z_t = logits at slot t (eq. 4 of `alignjax.models.lm`, the network's prediction of the
next token):

    log_probs[b, t] = z_{t-1}[y_t] - logsumexp_v z_{t-1}[v]   if mask[b, t], valid[b, t]
                                                               and valid[b, t-1] (t >= 1),
                      0                                        otherwise                 (eq. 1)
    sums[b]         = sum_t log_probs[b, t]                                              (eq. 2)

(the first real token of a row has no prediction and always scores 0). The plain path materialises the float32
logits [B, L, V]. The chunked path never does: it takes the final hidden states h [B, L, H]
(`TransformerLM.hidden_states`) and, for one chunk of `seq_chunk` positions at a time, runs
over vocabulary chunks W_c (columns of the output matrix: `lm_head.kernel`, or the embedding
transposed when tied) accumulating a streaming log-sum-exp

    m <- max(m, max_v z_c),   s <- s e^{m_old - m} + sum_v e^{z_c[v] - m},   lse = m + log s  (eq. 3)

with z_c = cap tanh(h W_c / cap) when the model has a final logit soft cap. The target logit is
h . W[:, y] (capped the same way). Peak temporary memory is then O(B seq_chunk vocab_chunk)
instead of O(B L V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

__all__ = ["ScoreOutput", "score", "score_model"]


@struct.dataclass
class ScoreOutput:
  """Per-token log-probs [B, L] (eq. 1; 0 where not scored) and their sums [B] (eq. 2)."""

  log_probs: jax.Array
  sums: jax.Array


def _output_matrix(model):
  """W_out as [H, V] (lm_head kernel, or the tied embedding transposed)."""
  if model.lm_head is None:
    return model.embed.embedding[...].T
  return model.lm_head.kernel[...]


def _cap(z, cap):
  return z if cap is None else cap * jnp.tanh(z / cap)


def _chunked_lse(h, w, cap, vocab_chunk: int):
  """logsumexp over the vocabulary of z = cap(h W) (eq. 3); h [..., H], w [H, V]."""
  hdim, v = w.shape
  nchunks = -(-v // vocab_chunk)
  pad = nchunks * vocab_chunk - v
  w = jnp.pad(w, ((0, 0), (0, pad))).reshape(hdim, nchunks, vocab_chunk).transpose(1, 0, 2)
  col = jnp.arange(nchunks * vocab_chunk).reshape(nchunks, vocab_chunk)
  init = (jnp.full(h.shape[:-1], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:-1], jnp.float32))

  def step(carry, inputs):
    m, s = carry
    wc, cols = inputs
    z = _cap(jnp.einsum("...h,hv->...v", h, wc, preferred_element_type=jnp.float32), cap)
    z = jnp.where(cols < v, z, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(z, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
    return (m_new, s), None

  (m, s), _ = jax.lax.scan(step, init, (w, col))
  return m + jnp.log(s)


def score_model(
    model, tokens, valid, mask, *, seq_chunk: int | None = None, vocab_chunk: int | None = None
) -> ScoreOutput:
  """Eqs. 1-2 for a `TransformerLM` (call inside jit). tokens/valid/mask [B, L].

  seq_chunk / vocab_chunk: chunk sizes of the chunked path (eq. 3); both None = plain path.
  """
  if tokens.ndim != 2 or tokens.shape != valid.shape or tokens.shape != mask.shape:
    raise ValueError(
        f"score: tokens {tokens.shape}, valid {valid.shape} and mask "
        f"{mask.shape} must all be [batch, length]"
    )
  for name, c in (("seq_chunk", seq_chunk), ("vocab_chunk", vocab_chunk)):
    if c is not None and (not isinstance(c, int) or c <= 0):
      raise ValueError(f"score: {name}={c!r} must be a positive int or None")
  b, l = tokens.shape
  valid = valid.astype(bool)
  previous = jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
  mask = mask.astype(bool) & valid & previous  # eq. 1: the first real token is not scored
  hidden, _ = model.hidden_states(tokens, valid=valid)
  h, y = hidden[:, :-1], tokens[:, 1:]
  if seq_chunk is None and vocab_chunk is None:
    lp = jax.nn.log_softmax(model.logits(h), axis=-1)  # eq. 1, full logits
    lp = jnp.take_along_axis(lp, y[..., None], axis=-1)[..., 0]
  else:
    w, cap = _output_matrix(model), model.config.final_logit_softcap
    vc = w.shape[1] if vocab_chunk is None else min(vocab_chunk, w.shape[1])
    sc = l - 1 if seq_chunk is None else min(seq_chunk, l - 1)
    n = -(-(l - 1) // sc)
    pad = n * sc - (l - 1)
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, sc, -1).transpose(1, 0, 2, 3)
    yp = jnp.pad(y, ((0, 0), (0, pad))).reshape(b, n, sc).transpose(1, 0, 2)

    def one(args):
      hc, yc = args
      target = _cap(
          jnp.einsum(
              "bsh,hbs->bs", hc, jnp.take(w, yc, axis=1), preferred_element_type=jnp.float32
          ),
          cap,
      )
      return target - _chunked_lse(hc, w, cap, vc)  # eq. 1 with eq. 3

    lp = jax.lax.map(one, (hp, yp)).transpose(1, 0, 2).reshape(b, n * sc)[:, : l - 1]
  lp = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), lp], axis=1)
  lp = jnp.where(mask, lp, 0.0)
  return ScoreOutput(log_probs=lp, sums=jnp.sum(lp, axis=-1))  # eq. 2


def score(
    graphdef,
    params,
    tokens,
    valid,
    mask,
    *,
    seq_chunk: int | None = None,
    vocab_chunk: int | None = None,
) -> ScoreOutput:
  """Pure form of `score_model` over split state (jit with graphdef and chunks static)."""
  return score_model(
      nnx.merge(graphdef, params), tokens, valid, mask, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk
  )
