r"""Autoregressive sampling from a `TransformerLM`: jitted prefill + KV-cache decode.

A batch of left-padded prompts (`tokens`, `valid` [B, P], every row with at least one real
token) is run through the model once (`prefill`), filling a KV cache of exactly P slots (the
prompt attends to its own keys only) that is then extended to P + N slots; then one token per
step is drawn inside a single `lax.while_loop` (`decode`) that stops after N = max_new_tokens
steps or as soon as every row has emitted an end-of-sequence token. `generate` is the two in
one pure function; the host entry `sample` runs them as two jitted programs, the decode loop
with its state donated (the loop writes the KV cache in place) and, on one CPU device, with
its float32 weight products done by the skinny-matrix kernel
(`alignjax.kernels.skinny_matmul`, when available) and compiled with
`CPU_DECODE_COMPILER_OPTIONS` (see there).

Sampling distribution at step s from the float32 logits z (one row):

    z' = z / T                                   (temperature T > 0)                   (eq. 1)
    top-k:  keep i iff z'_i >= z'_(k)            (z'_(k) the k-th largest; ties kept)  (eq. 2)
    top-p:  sort z' descending, p = softmax(z'), c_j = sum_{m <= j} p_m;
            keep the j-th token iff c_j - p_j < top_p (the mass strictly before it),
            i.e. the smallest prefix whose mass reaches top_p; ties with its last
            logit are kept (top-p is applied after top-k)                               (eq. 3)
    q = softmax(z' restricted to the kept set)   (renormalised)                        (eq. 4)
    y_s ~ q;   log_probs_s = log q(y_s);   model_log_probs_s = log softmax(z)(y_s)     (eq. 5)

T = 0 is greedy decoding: y_s = argmax z (lowest index on ties), q is a point mass and
log_probs_s = 0. `log_probs` are thus the log-probabilities of the distribution actually
sampled from (what importance ratios of the sampler need); `model_log_probs` are those of
the untempered, unfiltered model (what a policy-gradient or KL term usually needs).

Rows stop independently: once a row samples an id in `eos_ids`, that EOS is kept (valid),
and every later slot of the row holds `pad_id` with valid = False and log-probs 0.
Generated token s of row b has position n_b + s, with n_b the row's prompt length (positions
count real tokens only, `alignjax.models.lm` eq. 1).

Recompilation is bounded: the host entry `sample` re-pads prompts to a bucket length
(powers of two >= `min_bucket`, capped at the maximum prompt length), so any number of prompt
lengths compiles at most ~log2(max_prompt_len / min_bucket) + 2 buckets (a prefill and a decode
program each) per setting.
Randomness is the explicit key: step s uses `fold_in(key, s)`.

Data parallelism: `sample(..., mesh=mesh)` shards the prompts' rows over the data axes
(`alignjax.parallel.batch_sharding`: data x fsdp), places parameters that are not already on
the mesh by the LM sharding rules (`alignjax.models.lm.LM_SHARDING_RULES`; parameters already
on it, e.g. from `load_hf_lm(mesh=...)`, are used as they are) and replicates the key; the two
jitted programs then follow those shardings (the rows stay on their devices). The batch size
must be a multiple of data*fsdp (ShardingError otherwise; pad with dummy prompts and drop
their rows). With jax's partitionable threefry (the default), the draws do not depend on the
sharding, so tokens equal the one-device run for the same key. `decode_jit` picks the program
by the parameters' devices as before: the skinny-matrix kernel only on one CPU device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alignjax import parallel
from alignjax.kernels import skinny_matmul
from alignjax.models.lm import LM_SHARDING_RULES, KVCache, extend_cache, init_cache

__all__ = [
    "CPU_DECODE_COMPILER_OPTIONS",
    "DecodeState",
    "SampleOutput",
    "SamplingConfig",
    "bucket_length",
    "decode",
    "decode_jit",
    "filter_logits",
    "finish",
    "generate",
    "prefill",
    "sample",
    "sampling_log_probs",
]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: a jit static argument).

  max_new_tokens: N, the number of tokens to generate per row (> 0).
  temperature: T >= 0 (0 = greedy).
  top_k: keep the k most likely tokens (0 = no top-k filter).
  top_p: nucleus mass in (0, 1] (1 = no nucleus filter).
  eos_ids: ids that end a row (empty = never stop early).
  pad_id: written after a row's EOS.
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
      raise ValueError(
          f"SamplingConfig.max_new_tokens={self.max_new_tokens!r}: must be a " "positive int"
      )
    if not self.temperature >= 0:
      raise ValueError(
          f"SamplingConfig.temperature={self.temperature!r}: must be >= 0 " "(0 = greedy)"
      )
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k!r}: must be an int >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p={self.top_p!r}: must be in (0, 1] (1 = off)")


@struct.dataclass
class SampleOutput:
  """Generated tokens [B, N] int32, `valid` [B, N] bool (up to and including EOS),
  `log_probs` [B, N] (eq. 5, sampled distribution), `model_log_probs` [B, N] (untempered),
  `lengths` [B] int32 (number of valid tokens)."""

  tokens: jax.Array
  valid: jax.Array
  log_probs: jax.Array
  model_log_probs: jax.Array
  lengths: jax.Array


def filter_logits(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Tempered logits with tokens outside the top-k / nucleus set to -inf (eqs. 1-3).

  logits [..., V] float32; temperature > 0.
  """
  if temperature <= 0:
    raise ValueError(
        f"filter_logits: temperature={temperature} must be > 0 (T = 0 is greedy "
        "and has no logits to filter)"
    )
  z = logits.astype(jnp.float32) / temperature  # eq. 1
  neg = jnp.array(-jnp.inf, z.dtype)
  if 0 < top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z >= kth, z, neg)  # eq. 2
  if top_p < 1.0:
    sorted_z = jnp.sort(z, axis=-1)[..., ::-1]
    p = jax.nn.softmax(sorted_z, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p
    keep = before < top_p  # eq. 3 (the first token always has 0 mass before it)
    threshold = jnp.min(jnp.where(keep, sorted_z, jnp.inf), axis=-1, keepdims=True)
    z = jnp.where(z >= threshold, z, neg)
  return z


def sampling_log_probs(logits, config: SamplingConfig):
  """log q over the vocabulary (eq. 4) for logits [..., V]; greedy: log of a point mass."""
  if config.temperature == 0:
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(jax.nn.one_hot(greedy, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
  return jax.nn.log_softmax(
      filter_logits(logits, config.temperature, config.top_k, config.top_p), axis=-1
  )


def _draw(logits, key, config: SamplingConfig):
  """One token per row and its (sampled, model) log-probs (eq. 5); logits [B, V]."""
  model_lp = jax.nn.log_softmax(logits, axis=-1)
  if config.temperature == 0:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lp = jnp.zeros(token.shape, jnp.float32)
  else:
    z = filter_logits(logits, config.temperature, config.top_k, config.top_p)
    token = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), token[:, None], axis=-1)[:, 0]
  mlp = jnp.take_along_axis(model_lp, token[:, None], axis=-1)[:, 0]
  return token, lp, mlp


@struct.dataclass
class DecodeState:
  """What `prefill` hands to `decode`: the outputs so far ([B, N] each, step s filled for
  s < `step`), per-row `done` [B] and `last` token [B], the next `step` [], the prompt
  lengths n_b [B] and the KV cache (P + N slots)."""

  tokens: jax.Array
  valid: jax.Array
  log_probs: jax.Array
  model_log_probs: jax.Array
  done: jax.Array
  last: jax.Array
  step: jax.Array
  prompt_len: jax.Array
  cache: KVCache


def _record(state: DecodeState, logits, key, config: SamplingConfig) -> DecodeState:
  """Draws token `state.step` of every live row from logits [B, V] and stores it."""
  step = state.step
  token, lp, mlp = _draw(logits, jax.random.fold_in(key, step), config)
  live = ~state.done
  token = jnp.where(live, token, config.pad_id)
  eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
  return state.replace(
      tokens=state.tokens.at[:, step].set(token),
      valid=state.valid.at[:, step].set(live),
      log_probs=state.log_probs.at[:, step].set(jnp.where(live, lp, 0.0)),
      model_log_probs=state.model_log_probs.at[:, step].set(jnp.where(live, mlp, 0.0)),
      done=state.done | (live & jnp.isin(token, eos)),
      last=token,
      step=step + 1,
  )


def prefill(graphdef, params, tokens, valid, key, config: SamplingConfig) -> DecodeState:
  """Pure, jittable first half of `generate`: one forward over the prompts (tokens/valid
  [B, P] left-padded, every row with >= 1 real token) filling a KV cache of P + N slots, and
  the draw of the first new token from the last prompt position's logits."""
  model = nnx.merge(graphdef, params)
  b, p = tokens.shape
  n = config.max_new_tokens
  valid = valid.astype(bool)
  positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32)
  if p + n > model.config.max_position_embeddings:
    raise ValueError(
        f"generate: prompt length {p} + max_new_tokens {n} exceeds the model's "
        f"max_position_embeddings={model.config.max_position_embeddings}"
    )
  # A cache of exactly P slots: the prompt attends to its own keys only; then N empty slots.
  hidden, cache = model.hidden_states(tokens, positions, valid, init_cache(model.config, b, p))
  cache = extend_cache(cache, p + n)
  logits = model.logits(hidden[:, -1])  # left padding: the last column is real in every row
  state = DecodeState(
      tokens=jnp.full((b, n), config.pad_id, jnp.int32),
      valid=jnp.zeros((b, n), bool),
      log_probs=jnp.zeros((b, n), jnp.float32),
      model_log_probs=jnp.zeros((b, n), jnp.float32),
      done=jnp.zeros((b,), bool),
      last=jnp.zeros((b,), jnp.int32),
      step=jnp.zeros((), jnp.int32),
      prompt_len=jnp.sum(valid, axis=-1).astype(jnp.int32),
      cache=cache,
  )
  return _record(state, logits, key, config)


def decode(graphdef, params, state: DecodeState, key, config: SamplingConfig) -> DecodeState:
  """Pure, jittable second half of `generate`: one token per step in a `lax.while_loop`
  until N tokens or every row is done. Returns the final state (its cache too, so that a
  jit donating `state` updates the cache in place); `finish` turns it into a SampleOutput."""
  model = nnx.merge(graphdef, params)
  n = config.max_new_tokens

  def cond(state):
    return (state.step < n) & ~jnp.all(state.done)

  def body(state):
    live = ~state.done
    position = state.prompt_len + state.step - 1  # of the last token (module docstring)
    hidden, cache = model.hidden_states(
        state.last[:, None], position[:, None], live[:, None], state.cache
    )
    return _record(state.replace(cache=cache), model.logits(hidden[:, -1]), key, config)

  return jax.lax.while_loop(cond, body, state)


def finish(state: DecodeState) -> SampleOutput:
  """The sampler's output from a final `DecodeState`."""
  return SampleOutput(
      tokens=state.tokens,
      valid=state.valid,
      log_probs=state.log_probs,
      model_log_probs=state.model_log_probs,
      lengths=jnp.sum(state.valid, axis=-1).astype(jnp.int32),
  )


def generate(graphdef, params, tokens, valid, key, config: SamplingConfig) -> SampleOutput:
  """Pure, jittable sampler (shapes static): `prefill` then `decode`. tokens/valid [B, P]
  left-padded, every row with >= 1 real token; max_position_embeddings must be >= P + N."""
  state = prefill(graphdef, params, tokens, valid, key, config)
  return finish(decode(graphdef, params, state, key, config))


# Where the products of a CPU decode step go. XLA:CPU compiles a matrix product into a YNNPACK
# fusion (its default) or an Eigen call; a decode step multiplies B rows (a few) by every
# weight matrix once, so it is bound by streaming the weights from memory. For a 134M-parameter
# Llama at batch 8 on one AMD EPYC core, Eigen streamed 8.0-8.8 GB/s against YNNPACK's
# 5.5-5.8, while YNNPACK is faster for the prefill's large products, so the decode loop is a
# program of its own, compiled without YNNPACK fusions (a per-program option, not a flag).
# Both pack the weights before multiplying; on one device the float32 weight products of the
# loop go to `skinny_matmul`, which streams them unpacked (`benchmarks/lm_decode.py`).
CPU_DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _decode_with_kernel(graphdef, params, state, key, config):
  with skinny_matmul.enabled():
    return decode(graphdef, params, state, key, config)


_prefill_jit = jax.jit(prefill, static_argnums=(0, 5))
_decode_jit = {
    "cpu_kernel": jax.jit(
        _decode_with_kernel,
        static_argnums=(0, 4),
        donate_argnums=(2,),
        compiler_options=CPU_DECODE_COMPILER_OPTIONS,
    ),
    "cpu": jax.jit(
        decode,
        static_argnums=(0, 4),
        donate_argnums=(2,),
        compiler_options=CPU_DECODE_COMPILER_OPTIONS,
    ),
    None: jax.jit(decode, static_argnums=(0, 4), donate_argnums=(2,)),
}


def _devices(params) -> set:
  leaves = jax.tree.leaves(params)
  if leaves and isinstance(leaves[0], jax.Array):
    return set(leaves[0].devices())
  return {jax.devices()[0]}


def decode_jit(params, *, kernel: bool = True):
  """The jitted `decode` `sample` uses for params on their devices (state donated): on one
  CPU device the skinny-matrix kernel (unless `kernel` is False or it is unavailable), on
  several CPU devices the same compiler options without it, elsewhere plain."""
  devices = _devices(params)
  if any(d.platform != "cpu" for d in devices):
    return _decode_jit[None]
  if kernel and len(devices) == 1 and skinny_matmul.available()[0]:
    return _decode_jit["cpu_kernel"]
  return _decode_jit["cpu"]


def bucket_length(length: int, max_prompt_len: int, min_bucket: int = 16) -> int:
  """Smallest power of two >= max(length, min_bucket), capped at max_prompt_len."""
  if length > max_prompt_len:
    raise ValueError(
        f"sample: prompt length {length} exceeds the maximum prompt length "
        f"{max_prompt_len} (max_position_embeddings minus max_new_tokens, or the "
        "max_prompt_len given)"
    )
  bucket = max(min_bucket, 1)
  while bucket < length:
    bucket *= 2
  return min(bucket, max_prompt_len)


def sample(
    model_or_graphdef,
    params,
    tokens,
    valid,
    key,
    config: SamplingConfig,
    *,
    max_prompt_len: int | None = None,
    min_bucket: int = 16,
    mesh=None,
    rules=None,
) -> SampleOutput:
  """Host entry: checks the prompts, re-pads them to a bucket length, runs `generate` jitted.

  model_or_graphdef: a `TransformerLM` (params None) or its graphdef (params its state).
  tokens, valid: left-padded prompts [B, P] (e.g. `alignjax.models.convert.pad_left`).
  max_prompt_len: longest prompt accepted (default and upper bound: the model's
    max_position_embeddings - max_new_tokens); longer prompts raise ValueError.
  mesh: run data-parallel on this mesh (module docstring): prompts sharded over data x fsdp
    (B must be a multiple of data*fsdp, else ShardingError), parameters not already on the
    mesh's devices placed by `rules` (default `LM_SHARDING_RULES`), the key replicated.
  """
  if params is None:
    graphdef, params = nnx.split(model_or_graphdef)
  else:
    graphdef = model_or_graphdef
  max_pos = nnx.merge(graphdef, params).config.max_position_embeddings
  limit = max_pos - config.max_new_tokens
  if max_prompt_len is not None:
    if max_prompt_len > limit:
      raise ValueError(
          f"sample: max_prompt_len={max_prompt_len} + max_new_tokens="
          f"{config.max_new_tokens} exceeds max_position_embeddings={max_pos}"
      )
    limit = max_prompt_len
  if limit <= 0:
    raise ValueError(
        f"sample: max_new_tokens={config.max_new_tokens} leaves no room for a "
        f"prompt under max_position_embeddings={max_pos}"
    )
  tokens, valid = np.asarray(tokens, np.int32), np.asarray(valid, bool)
  if tokens.ndim != 2 or tokens.shape != valid.shape:
    raise ValueError(
        f"sample: tokens {tokens.shape} and valid {valid.shape} must both be " "[batch, length]"
    )
  if not valid[:, -1].all() or (np.diff(valid.astype(np.int8), axis=1) < 0).any():
    raise ValueError(
        "sample: prompts must be left-padded with >= 1 real token per row "
        "(valid = [False ... False, True ... True]); see convert.pad_left"
    )
  length = int(valid.sum(axis=1).max())
  bucket = bucket_length(length, limit, min_bucket)
  if tokens.shape[1] >= bucket:
    tokens, valid = tokens[:, -bucket:], valid[:, -bucket:]
  else:
    extra = bucket - tokens.shape[1]
    tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=config.pad_id)
    valid = np.pad(valid, ((0, 0), (extra, 0)), constant_values=False)
  if mesh is None:
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
  else:
    parallel.check_batch_divisible(tokens.shape[0], mesh, "sample")
    params = parallel.put_on_mesh(params, mesh, LM_SHARDING_RULES if rules is None else rules)
    rows = parallel.batch_sharding(mesh)
    tokens, valid = parallel.put_global(tokens, rows), parallel.put_global(valid, rows)
    key = parallel.put_global(key, parallel.replicated(mesh))
  state = _prefill_jit(graphdef, params, tokens, valid, key, config)
  return finish(decode_jit(params)(graphdef, params, state, key, config))
