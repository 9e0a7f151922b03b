r"""Teacher-forced log-probabilities of given continuations under a `TransformerLM`.

A batch holds left-padded sequences `tokens` [B, L] (prompt followed by response, `valid`
marking real tokens) and `mask` [B, L] marking the tokens to score (usually the response).
With z_t = logits at slot t (eq. 4 of `alignjax.models.lm`, the network's prediction of the
next token):

    log_probs[b, t] = z_{t-1}[y_t] - logsumexp_v z_{t-1}[v]   if mask[b, t], valid[b, t]
                                                               and valid[b, t-1] (t >= 1),
                      0                                        otherwise                 (eq. 1)
    sums[b]         = sum_t log_probs[b, t]                                              (eq. 2)

(the first real token of a row has no prediction and always scores 0; `start` > 0 skips the
slots before it too, and the output matrix is applied to the N = B (L - max(start, 1)) rows
that remain). The plain path materialises the float32 logits z [N, V] of the rows flattened,
and its gradient is written out (a custom VJP) from the saved z and lse = logsumexp z:

    dz = g (onehot(y) - e^{z - lse}) (times 1 - (z/cap)^2 under a soft cap),
    dh = dz W^T,   dW = h^T dz                                                          (eq. 5)

one elementwise pass over [N, V] and two products, where autodiff of log_softmax and the
gather adds a scatter into zeros [N, V] and (XLA:CPU, rows [B, L] not flattened) a transposed
copy of dz for dW. The chunked path never materialises the logits: it takes the final hidden
states h [B, L, H] (`TransformerLM.hidden_states`) and, for one chunk of `seq_chunk` positions at a time, runs
over vocabulary chunks W_c (columns of the output matrix: `lm_head.kernel`, or the embedding
transposed when tied) accumulating a streaming log-sum-exp

    m <- max(m, max_v z_c),   s <- s e^{m_old - m} + sum_v e^{z_c[v] - m},   lse = m + log s  (eq. 3)

with z_c = cap tanh(h W_c / cap) when the model has a final logit soft cap. The target logit is
h . W[:, y] (capped the same way). Peak temporary memory is then O(B seq_chunk vocab_chunk)
instead of O(B L V). Its gradients are plain reverse-mode autodiff through the two scans (no
custom VJP); `tests/lm/test_lm_scoring.py` checks them against the plain path and, in float64
(`token_log_probs` keeps float64 inputs in float64), against central finite differences.

Data parallelism: `score(..., mesh=mesh)` (inside jit, `mesh` static) constrains the batch
to `alignjax.parallel.batch_sharding(mesh)` (rows over data x fsdp) and the parameters to the
LM sharding rules; the batch size must be a multiple of data*fsdp (pad with masked rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from alignjax import parallel
from alignjax.models.lm import LM_SHARDING_RULES

__all__ = ["ScoreOutput", "score", "score_model", "token_log_probs"]


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


def _check_chunks(seq_chunk, vocab_chunk):
  for name, c in (("seq_chunk", seq_chunk), ("vocab_chunk", vocab_chunk)):
    if c is not None and (not isinstance(c, int) or c <= 0):
      raise ValueError(f"score: {name}={c!r} must be a positive int or None")


def _chunked_lse(h, w, cap, vocab_chunk: int, acc):
  """logsumexp over the vocabulary of z = cap(h W) (eq. 3) in dtype `acc`; h [..., H], w [H, V]."""
  hdim, v = w.shape
  nchunks = -(-v // vocab_chunk)
  pad = nchunks * vocab_chunk - v
  w = jnp.pad(w, ((0, 0), (0, pad))).reshape(hdim, nchunks, vocab_chunk).transpose(1, 0, 2)
  col = jnp.arange(nchunks * vocab_chunk).reshape(nchunks, vocab_chunk)
  init = (jnp.full(h.shape[:-1], -jnp.inf, acc), jnp.zeros(h.shape[:-1], acc))

  def step(carry, inputs):
    m, s = carry
    wc, cols = inputs
    z = _cap(jnp.einsum("...h,hv->...v", h, wc, preferred_element_type=acc), cap)
    z = jnp.where(cols < v, z, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(z, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
    return (m_new, s), None

  (m, s), _ = jax.lax.scan(step, init, (w, col))
  return m + jnp.log(s)


def _full_vocab_forward(h, y, w, cap):
  """eq. 1 over the whole vocabulary for h [N, H], y [N], w [H, V]: (log-probs [N], residuals)."""
  acc = jnp.promote_types(jnp.promote_types(h.dtype, w.dtype), jnp.float32)
  z = _cap(jnp.einsum("nh,hv->nv", h, w, preferred_element_type=acc), cap)  # [N, V]
  lse = jax.nn.logsumexp(z, axis=-1)
  target = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
  return target - lse, (h, y, w, z, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _full_vocab_log_probs(h, y, w, cap):
  """eq. 1 with the full logits z [N, V] of 2-d h [N, H] (see `_full_vocab_backward`)."""
  return _full_vocab_forward(h, y, w, cap)[0]


def _full_vocab_backward(cap, residuals, g):
  """eq. 5: the gradient of eq. 1 from the saved logits, in one pass over [N, V] and two
  products (no scatter for the target, no transposed copy of dz for dW)."""
  h, y, w, z, lse = residuals
  onehot = jnp.arange(z.shape[-1]) == y[:, None]
  dz = g[:, None] * (onehot.astype(z.dtype) - jnp.exp(z - lse[:, None]))
  if cap is not None:  # z = cap tanh(u / cap): dz/du = 1 - (z / cap)^2
    dz = dz * (1 - jnp.square(z / cap))
  dh = jnp.einsum("nv,hv->nh", dz, w, preferred_element_type=z.dtype)
  dw = jnp.einsum("nh,nv->hv", h, dz, preferred_element_type=z.dtype)
  return dh.astype(h.dtype), None, dw.astype(w.dtype)


_full_vocab_log_probs.defvjp(
    lambda h, y, w, cap: _full_vocab_forward(h, y, w, cap), _full_vocab_backward
)


def token_log_probs(h, y, w, cap=None, *, seq_chunk: int | None = None, vocab_chunk=None):
  """log softmax(cap(h W))[y] (eq. 1; eq. 3 when chunked) without masking.

  h [B, S, H] hidden states, y [B, S] targets, w [H, V] output matrix, cap the final logit
  soft cap (None: none). Computed in float32, or float64 when h and w are (under x64).
  seq_chunk / vocab_chunk: chunk sizes (None: the whole axis; both None: full logits, with
  the gradient of eq. 5).
  """
  _check_chunks(seq_chunk, vocab_chunk)
  if h.ndim != 3 or y.shape != h.shape[:2] or w.ndim != 2 or w.shape[0] != h.shape[-1]:
    raise ValueError(
        f"token_log_probs: h {h.shape} [B, S, H], y {y.shape} [B, S] and w {w.shape} [H, V] "
        "do not fit together"
    )
  acc = jnp.promote_types(jnp.promote_types(h.dtype, w.dtype), jnp.float32)
  b, length = y.shape
  if seq_chunk is None and vocab_chunk is None:  # rows flattened: [N, H] products (eq. 5)
    lp = _full_vocab_log_probs(h.reshape(b * length, -1), y.reshape(-1), w, cap)
    return lp.reshape(b, length)
  vc = w.shape[1] if vocab_chunk is None else min(vocab_chunk, w.shape[1])
  sc = length if seq_chunk is None else min(seq_chunk, length)
  n = -(-length // sc)
  pad = n * sc - length
  hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, sc, -1).transpose(1, 0, 2, 3)
  yp = jnp.pad(y, ((0, 0), (0, pad))).reshape(b, n, sc).transpose(1, 0, 2)

  def one(args):
    hc, yc = args
    target = _cap(
        jnp.einsum("bsh,hbs->bs", hc, jnp.take(w, yc, axis=1), preferred_element_type=acc), cap
    )
    return target - _chunked_lse(hc, w, cap, vc, acc)  # eq. 1 with eq. 3

  return jax.lax.map(one, (hp, yp)).transpose(1, 0, 2).reshape(b, n * sc)[:, :length]


def score_model(
    model,
    tokens,
    valid,
    mask,
    *,
    seq_chunk: int | None = None,
    vocab_chunk: int | None = None,
    start: int = 0,
    mesh=None,
) -> ScoreOutput:
  """Eqs. 1-2 for a `TransformerLM` (call inside jit). tokens/valid/mask [B, L].

  seq_chunk / vocab_chunk: chunk sizes of the chunked path (eq. 3); both None = plain path.
  start: slots before it are not scored (log-prob 0 whatever `mask` says), and the output
    matrix is applied only from slot `start` on (a fixed-width prompt: its width). The
    network still runs over all L slots (the prompt is the context).
  mesh: when given, the batch (inputs and outputs) is constrained to
    `parallel.batch_sharding(mesh)` (data-parallel over data x fsdp); B must be a multiple of
    data*fsdp (ShardingError otherwise: pad the batch with masked rows).
  """
  if tokens.ndim != 2 or tokens.shape != valid.shape or tokens.shape != mask.shape:
    raise ValueError(
        f"score: tokens {tokens.shape}, valid {valid.shape} and mask "
        f"{mask.shape} must all be [batch, length]"
    )
  _check_chunks(seq_chunk, vocab_chunk)
  b, l = tokens.shape
  if not isinstance(start, int) or not 0 <= start < l:
    raise ValueError(f"score: start={start!r} must be an int in [0, length={l})")
  constrain = lambda x: x
  if mesh is not None:
    parallel.check_batch_divisible(b, mesh, "score")
    constrain = lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))
    tokens, valid, mask = constrain(tokens), constrain(valid), constrain(mask)
  valid = valid.astype(bool)
  previous = jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
  mask = mask.astype(bool) & valid & previous  # eq. 1: the first real token is not scored
  first = max(start, 1)  # slot 0 has no prediction
  mask = mask & (jnp.arange(l) >= first)
  hidden, _ = model.hidden_states(tokens, valid=valid)
  h, y = hidden[:, first - 1 : -1], tokens[:, first:]  # slots first .. L-1 (eq. 1)
  w, cap = _output_matrix(model), model.config.final_logit_softcap
  lp = token_log_probs(h, y, w, cap, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)
  lp = jnp.concatenate([jnp.zeros((b, first), lp.dtype), lp], axis=1)
  lp = constrain(jnp.where(mask, lp, 0.0))
  return ScoreOutput(log_probs=lp, sums=constrain(jnp.sum(lp, axis=-1)))  # eq. 2


def score(
    graphdef,
    params,
    tokens,
    valid,
    mask,
    *,
    seq_chunk: int | None = None,
    vocab_chunk: int | None = None,
    start: int = 0,
    mesh=None,
    rules=None,
) -> ScoreOutput:
  """Pure form of `score_model` over split state (jit with graphdef, chunks, start, mesh and
  rules static). With a `mesh`, the batch is data-parallel (see `score_model`) and `params` are
  constrained to the shardings `rules` give (default `LM_SHARDING_RULES`; a no-op when they
  already have them, e.g. from `load_hf_lm(mesh=...)`)."""
  if mesh is not None:
    rules = LM_SHARDING_RULES if rules is None else rules
    params = jax.lax.with_sharding_constraint(params, parallel.param_shardings(params, mesh, rules))
  return score_model(
      nnx.merge(graphdef, params),
      tokens,
      valid,
      mask,
      seq_chunk=seq_chunk,
      vocab_chunk=vocab_chunk,
      start=start,
      mesh=mesh,
  )
