r"""Sampling from the token-level geometric mixture of several LMs (Nash-MD's sampler).

Nash-MD draws its responses from the geometric mixture of the policy π_θ and the reference
π_ref with weights (1 - β, β). This module does it for any M >= 1 `TransformerLM`s sharing
one vocabulary, with weights w [M] (w_m >= 0, Σ_m w_m = 1). With z_m the float32 logits of
model m at decoding step s (one row):

    z_mix = Σ_m w_m z_m                                                                (eq. 1)

Because log softmax(z_m) = z_m - lse(z_m) differs from z_m by a constant over the vocabulary,
softmax(z_mix) ∝ Π_m softmax(z_m)^{w_m}: eq. 1 is the normalised token-level geometric mixture

    π_mix(v | prefix) = Π_m π_m(v | prefix)^{w_m} / Σ_u Π_m π_m(u | prefix)^{w_m}          (eq. 2)

(per token, as Nash-MD samples it; not the sequence-level mixture Π_m π_m(y|x)^{w_m} / Z).
The sampled distribution is z_mix filtered exactly as `alignjax.lm.sampling` filters a
single model's logits (its eqs. 1-4: temperature, then top-k, then top-p), i.e. after mixing:

    q = softmax(filter_{T, k, p}(z_mix))                                               (eq. 3)
    y_s ~ q;  log_probs_s = log q(y_s);  model_log_probs[m]_s = log softmax(z_m)(y_s)   (eq. 4)

T = 0 is greedy (argmax z_mix, log_probs_s = 0). A zero weight contributes exactly nothing
(`mix_logits` drops w_m z_m where w_m = 0), so weights (1, 0, ...) give z_mix = z_1 bit for bit.
The sequence log-probability of the sampler is Σ_s log_probs_s over valid steps          (eq. 5)

Everything else is `sampling`'s: left-padded prompts, prefill into a cache of exactly P slots
extended to P + N, one `lax.while_loop` that stops after N steps or when every row has emitted
an EOS (kept, valid; `pad_id` and log-probs 0 after it), step s drawn with `fold_in(key, s)`.
One draw per step from z_mix, with the same key schedule and the same
`jax.random.categorical` call as `sampling`, so with one model (or weights (1, 0, ...)) the
tokens are `sampling.sample`'s for the same key.

Programs: `mixture_prefill` runs every model over the prompts and draws token 1;
`mixture_decode` carries all M KV caches in one `lax.while_loop` (one forward of each model
per step). The host entry `sample_mixture` jits both, graphdefs and config static, the decode
with its state (every cache) donated, and the weights a traced float32 array [M]: changing β
does not recompile. Kernel: as in `sampling.decode_jit`, the decode loop of parameters on one
CPU device runs its float32 weight products (all models') through
`alignjax.kernels.skinny_matmul` and compiles with `sampling.CPU_DECODE_COMPILER_OPTIONS`; on
several CPU devices the options without the kernel; elsewhere plain XLA. It applies cleanly:
the kernel scope is read while tracing, so entering it inside the jitted decode covers every
model's products, and it falls back to XLA for products that do not qualify.

Data parallelism: `sample_mixture(..., mesh=mesh)` shards the prompt rows over data x fsdp,
places each model's parameters that are not on the mesh by `rules` (default the LM rules) and
replicates the weights and the key, as `sampling.sample` does; tokens equal the one-device run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alignjax import parallel
from alignjax.kernels import skinny_matmul
from alignjax.lm import sampling
from alignjax.lm.sampling import SamplingConfig, bucket_length, filter_logits
from alignjax.models.lm import LM_SHARDING_RULES, KVCache, extend_cache, init_cache

__all__ = [
    "MixtureDecodeState",
    "MixtureSampleOutput",
    "check_weights",
    "finish_mixture",
    "generate_mixture",
    "mix_logits",
    "mixture_decode",
    "mixture_decode_jit",
    "mixture_log_probs",
    "mixture_prefill",
    "sample_mixture",
]

WEIGHT_SUM_TOL = 1e-5  # |Σ w - 1| accepted (float32 weights such as (0.9, 0.1))


@struct.dataclass
class MixtureSampleOutput:
  """Generated tokens [B, N] int32, `valid` [B, N] bool (up to and including EOS),
  `log_probs` [B, N] (eq. 4, the sampled mixture distribution), `model_log_probs` [M, B, N]
  (each model's untempered log-probs, eq. 4), `lengths` [B] int32 (valid tokens per row)."""

  tokens: jax.Array
  valid: jax.Array
  log_probs: jax.Array
  model_log_probs: jax.Array
  lengths: jax.Array


@struct.dataclass
class MixtureDecodeState:
  """`sampling.DecodeState` with per-model log-probs [M, B, N] and one KV cache per model."""

  tokens: jax.Array
  valid: jax.Array
  log_probs: jax.Array
  model_log_probs: jax.Array
  done: jax.Array
  last: jax.Array
  step: jax.Array
  prompt_len: jax.Array
  caches: tuple[KVCache, ...]


def check_weights(weights, num_models: int) -> np.ndarray:
  """Host check of mixture weights: [M] finite, >= 0, summing to 1 (within WEIGHT_SUM_TOL).
  Returns them as float32 numpy."""
  if num_models < 1:
    raise ValueError("sample_mixture: needs at least one model (M >= 1), got none")
  try:
    w = np.asarray(weights, np.float64)
  except (TypeError, ValueError, jax.errors.TracerArrayConversionError) as e:
    raise ValueError(
        f"sample_mixture: weights must be concrete numbers (a tuple of floats or an array "
        f"[M]), got {type(weights).__name__}"
    ) from e
  if w.shape != (num_models,):
    raise ValueError(
        f"sample_mixture: weights have shape {w.shape}, expected ({num_models},): one weight "
        "per model"
    )
  if not np.isfinite(w).all() or (w < 0).any():
    raise ValueError(f"sample_mixture: weights {w.tolist()} must be finite and >= 0")
  if abs(w.sum() - 1.0) > WEIGHT_SUM_TOL:
    raise ValueError(
        f"sample_mixture: weights {w.tolist()} sum to {w.sum():.8g}, must sum to 1 "
        f"(within {WEIGHT_SUM_TOL:g}); e.g. Nash-MD's (1 - beta, beta)"
    )
  return w.astype(np.float32)


def mix_logits(logits, weights):
  """z_mix (eq. 1) from logits [M, ..., V] and weights [M]; a zero weight adds nothing.
  Elementwise float32 (no matrix product, so no reduced-precision dot on accelerators)."""
  logits = jnp.asarray(logits, jnp.float32)
  w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (logits.ndim - 1))
  if w.shape[0] != logits.shape[0]:
    raise ValueError(f"mix_logits: {w.shape[0]} weights for {logits.shape[0]} models' logits")
  return jnp.sum(jnp.where(w > 0, w * logits, 0.0), axis=0)


def mixture_log_probs(logits, weights, config: SamplingConfig):
  """log q over the vocabulary (eq. 3) for logits [M, ..., V]; greedy: a point mass."""
  return sampling.sampling_log_probs(mix_logits(logits, weights), config)


def _draw(logits, weights, key, config: SamplingConfig):
  """One token per row from logits [M, B, V]: (token [B], log q [B], model log-probs [M, B])
  (eqs. 3-4), drawn exactly as `sampling` draws from a single model's logits."""
  z_mix = mix_logits(logits, weights)  # eq. 1
  if config.temperature == 0:
    token = jnp.argmax(z_mix, axis=-1).astype(jnp.int32)
    lp = jnp.zeros(token.shape, jnp.float32)
  else:
    z = filter_logits(z_mix, config.temperature, config.top_k, config.top_p)  # eq. 3
    token = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), token[:, None], axis=-1)[:, 0]
  model_lp = jax.nn.log_softmax(logits, axis=-1)  # eq. 4, untempered
  idx = jnp.broadcast_to(token[None, :, None], model_lp.shape[:2] + (1,))
  return token, lp, jnp.take_along_axis(model_lp, idx, axis=-1)[..., 0]


def _record(state: MixtureDecodeState, logits, weights, key, config) -> MixtureDecodeState:
  """Draws token `state.step` of every live row from logits [M, B, V] and stores it."""
  step = state.step
  token, lp, mlp = _draw(logits, weights, jax.random.fold_in(key, step), config)
  live = ~state.done
  token = jnp.where(live, token, config.pad_id)
  eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
  return state.replace(
      tokens=state.tokens.at[:, step].set(token),
      valid=state.valid.at[:, step].set(live),
      log_probs=state.log_probs.at[:, step].set(jnp.where(live, lp, 0.0)),
      model_log_probs=state.model_log_probs.at[:, :, step].set(jnp.where(live, mlp, 0.0)),
      done=state.done | (live & jnp.isin(token, eos)),
      last=token,
      step=step + 1,
  )


def _models(graphdefs, params):
  if len(graphdefs) != len(params) or not graphdefs:
    raise ValueError(
        f"mixture: {len(graphdefs)} graphdefs and {len(params)} parameter states: need one "
        "state per graphdef and at least one model"
    )
  models = [nnx.merge(g, p) for g, p in zip(graphdefs, params)]
  vocab = models[0].config.vocab_size
  for m, model in enumerate(models[1:], 1):
    if model.config.vocab_size != vocab:
      raise ValueError(
          f"mixture: model 0 has vocab_size={vocab} but model {m} has "
          f"vocab_size={model.config.vocab_size}; the models must share one vocabulary"
      )
  return models


def mixture_prefill(
    graphdefs, params, weights, tokens, valid, key, config: SamplingConfig
) -> MixtureDecodeState:
  """Pure, jittable first half of `generate_mixture`: every model over the prompts (tokens /
  valid [B, P] left-padded, >= 1 real token per row), each filling its own cache of P + N
  slots, then token 1 drawn from the mixture of the last prompt position's logits."""
  models = _models(graphdefs, params)
  b, p = tokens.shape
  n = config.max_new_tokens
  valid = valid.astype(bool)
  positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32)
  caches, logits = [], []
  for m, model in enumerate(models):
    if p + n > model.config.max_position_embeddings:
      raise ValueError(
          f"generate_mixture: prompt length {p} + max_new_tokens {n} exceeds model {m}'s "
          f"max_position_embeddings={model.config.max_position_embeddings}"
      )
    hidden, cache = model.hidden_states(tokens, positions, valid, init_cache(model.config, b, p))
    caches.append(extend_cache(cache, p + n))
    logits.append(model.logits(hidden[:, -1]))  # left padding: the last column is real
  state = MixtureDecodeState(
      tokens=jnp.full((b, n), config.pad_id, jnp.int32),
      valid=jnp.zeros((b, n), bool),
      log_probs=jnp.zeros((b, n), jnp.float32),
      model_log_probs=jnp.zeros((len(models), b, n), jnp.float32),
      done=jnp.zeros((b,), bool),
      last=jnp.zeros((b,), jnp.int32),
      step=jnp.zeros((), jnp.int32),
      prompt_len=jnp.sum(valid, axis=-1).astype(jnp.int32),
      caches=tuple(caches),
  )
  return _record(state, jnp.stack(logits), weights, key, config)


def mixture_decode(
    graphdefs, params, weights, state: MixtureDecodeState, key, config: SamplingConfig
) -> MixtureDecodeState:
  """Pure, jittable second half: one `lax.while_loop` over all M caches, each step one
  forward of every model on the last token and one draw from their mixture (eqs. 1-4)."""
  models = _models(graphdefs, params)
  n = config.max_new_tokens

  def cond(state):
    return (state.step < n) & ~jnp.all(state.done)

  def body(state):
    live = ~state.done
    position = state.prompt_len + state.step - 1  # of the last token
    caches, logits = [], []
    for model, cache in zip(models, state.caches):
      hidden, cache = model.hidden_states(
          state.last[:, None], position[:, None], live[:, None], cache
      )
      caches.append(cache)
      logits.append(model.logits(hidden[:, -1]))
    state = state.replace(caches=tuple(caches))
    return _record(state, jnp.stack(logits), weights, key, config)

  return jax.lax.while_loop(cond, body, state)


def finish_mixture(state: MixtureDecodeState) -> MixtureSampleOutput:
  """The sampler's output from a final `MixtureDecodeState`."""
  return MixtureSampleOutput(
      tokens=state.tokens,
      valid=state.valid,
      log_probs=state.log_probs,
      model_log_probs=state.model_log_probs,
      lengths=jnp.sum(state.valid, axis=-1).astype(jnp.int32),
  )


def generate_mixture(
    graphdefs, params, weights, tokens, valid, key, config: SamplingConfig
) -> MixtureSampleOutput:
  """Pure, jittable mixture sampler: `mixture_prefill` then `mixture_decode`. graphdefs a
  tuple (static), params the matching tuple of states, weights [M] (traced is fine)."""
  state = mixture_prefill(graphdefs, params, weights, tokens, valid, key, config)
  return finish_mixture(mixture_decode(graphdefs, params, weights, state, key, config))


def _decode_with_kernel(graphdefs, params, weights, state, key, config):
  with skinny_matmul.enabled():  # read while tracing: covers every model's products
    return mixture_decode(graphdefs, params, weights, state, key, config)


_prefill_jit = jax.jit(mixture_prefill, static_argnums=(0, 6))
_jit_args = dict(static_argnums=(0, 5), donate_argnums=(3,))
_decode_jit = {
    "cpu_kernel": jax.jit(
        _decode_with_kernel,
        **_jit_args,
        compiler_options=sampling.CPU_DECODE_COMPILER_OPTIONS,
    ),
    "cpu": jax.jit(
        mixture_decode, **_jit_args, compiler_options=sampling.CPU_DECODE_COMPILER_OPTIONS
    ),
    None: jax.jit(mixture_decode, **_jit_args),
}


def _devices(params) -> set:
  devices = set()
  for leaf in jax.tree.leaves(params):
    devices |= set(leaf.devices()) if isinstance(leaf, jax.Array) else {jax.devices()[0]}
  return devices or {jax.devices()[0]}


def mixture_decode_jit(params, *, kernel: bool = True):
  """The jitted `mixture_decode` (state donated) for params (tuple) on their devices, chosen
  as `sampling.decode_jit` chooses: the skinny-matrix kernel on one CPU device (unless
  `kernel` is False or it is unavailable), CPU options without it on several, else plain."""
  devices = _devices(params)
  if any(d.platform != "cpu" for d in devices):
    return _decode_jit[None]
  if kernel and len(devices) == 1 and skinny_matmul.available()[0]:
    return _decode_jit["cpu_kernel"]
  return _decode_jit["cpu"]


def _split_models(models):
  """(graphdefs, params) tuples from TransformerLMs or (graphdef, params) pairs."""
  if isinstance(models, nnx.Module) or not isinstance(models, (tuple, list)) or not models:
    raise ValueError(
        "sample_mixture: models must be a non-empty tuple of TransformerLMs or (graphdef, "
        f"params) pairs, got {type(models).__name__}"
    )
  graphdefs, params = [], []
  for m, entry in enumerate(models):
    if isinstance(entry, nnx.GraphDef):
      raise ValueError(
          f"sample_mixture: models[{m}] is a GraphDef: pass a tuple of models, e.g. "
          "((graphdef, params),) for one model, not a bare (graphdef, params) pair"
      )
    if isinstance(entry, nnx.Module):
      g, p = nnx.split(entry)
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
      g, p = entry
    else:
      raise ValueError(
          f"sample_mixture: models[{m}] is a {type(entry).__name__}; each model must be a "
          "TransformerLM or a (graphdef, params) pair"
      )
    graphdefs.append(g)
    params.append(p)
  return tuple(graphdefs), tuple(params)


def _bucketed_prompts(tokens, valid, limit: int, min_bucket: int, pad_id: int):
  """Checked left-padded prompts re-padded to their bucket (as `sampling.sample` does)."""
  tokens, valid = np.asarray(tokens, np.int32), np.asarray(valid, bool)
  if tokens.ndim != 2 or tokens.shape != valid.shape:
    raise ValueError(
        f"sample_mixture: tokens {tokens.shape} and valid {valid.shape} must both be "
        "[batch, length]"
    )
  if not valid[:, -1].all() or (np.diff(valid.astype(np.int8), axis=1) < 0).any():
    raise ValueError(
        "sample_mixture: prompts must be left-padded with >= 1 real token per row "
        "(valid = [False ... False, True ... True]); see convert.pad_left"
    )
  bucket = bucket_length(int(valid.sum(axis=1).max()), limit, min_bucket)
  if tokens.shape[1] >= bucket:
    return tokens[:, -bucket:], valid[:, -bucket:]
  extra = bucket - tokens.shape[1]
  return (
      np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
      np.pad(valid, ((0, 0), (extra, 0)), constant_values=False),
  )


def sample_mixture(
    models,
    weights,
    tokens,
    valid,
    key,
    config: SamplingConfig,
    *,
    max_prompt_len: int | None = None,
    min_bucket: int = 16,
    mesh=None,
    rules=None,
) -> MixtureSampleOutput:
  """Host entry: draws from the geometric mixture (eqs. 1-4) of `models` with `weights`.

  models: tuple of M >= 1 TransformerLMs or (graphdef, params) pairs sharing a vocabulary.
  weights: M floats (or an array [M]), >= 0, summing to 1; passed to the programs as a traced
    array, so new weights (Nash-MD's (1 - β, β) for a new β) reuse the compiled programs.
  tokens, valid, max_prompt_len, min_bucket, mesh, rules: as for `sampling.sample` (the
    prompt limit is the smallest model's max_position_embeddings - max_new_tokens; with a
    mesh every model's parameters are placed by `rules`, default `LM_SHARDING_RULES`).
  """
  graphdefs, params = _split_models(models)
  w = check_weights(weights, len(graphdefs))
  merged = _models(graphdefs, params)
  max_pos = min(m.config.max_position_embeddings for m in merged)
  limit = max_pos - config.max_new_tokens
  if max_prompt_len is not None:
    if max_prompt_len > limit:
      raise ValueError(
          f"sample_mixture: max_prompt_len={max_prompt_len} + max_new_tokens="
          f"{config.max_new_tokens} exceeds the smallest max_position_embeddings={max_pos}"
      )
    limit = max_prompt_len
  if limit <= 0:
    raise ValueError(
        f"sample_mixture: max_new_tokens={config.max_new_tokens} leaves no room for a "
        f"prompt under the smallest max_position_embeddings={max_pos}"
    )
  tokens, valid = _bucketed_prompts(tokens, valid, limit, min_bucket, config.pad_id)
  if mesh is None:
    tokens, valid, w = jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(w)
  else:
    parallel.check_batch_divisible(tokens.shape[0], mesh, "sample_mixture")
    rules = LM_SHARDING_RULES if rules is None else rules
    params = tuple(parallel.put_on_mesh(p, mesh, rules) for p in params)
    rows = parallel.batch_sharding(mesh)
    tokens, valid = parallel.put_global(tokens, rows), parallel.put_global(valid, rows)
    key = parallel.put_global(key, parallel.replicated(mesh))
    w = parallel.put_global(w, parallel.replicated(mesh))
  state = _prefill_jit(graphdefs, params, w, tokens, valid, key, config)
  decode = mixture_decode_jit(params)
  return finish_mixture(decode(graphdefs, params, w, state, key, config))
