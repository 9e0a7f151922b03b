"""Decoder-only transformer LM for the Llama, Qwen2/3, Gemma 1/2 and GPT-2 families.

One NNX module, `TransformerLM(config)`, configured by `LMConfig` (see `lm_config`, which
translates HF config.json files); layer maths in `lm_layers`. Checkpoint loading and export
live in `alignjax.models.convert`.

    model(tokens [B, L], positions [B, L], valid [B, L], cache=None) -> (logits [B, L, V], cache)

Inputs are left-padded: `valid` marks real tokens, and positions count real tokens only:

    p_t = max(sum_{s <= t} valid_s - 1, 0)                                           (eq. 1)

Token t attends to key slot s when (slots index the input, or the KV cache when given)

    allowed(t, s) = valid_s and slot_s <= slot_t and (global layer or p_t - p_s < W)  (eq. 2)

with W the sliding window of local layers (Gemma 2, Qwen). The network is

    h_0 = E[x] * (sqrt(H) if embed_scale) (+ P[p] for learned positions, GPT-2)      (eq. 3)
    h_l = Block_l(h_{l-1})   (pre-norm residual blocks, `lm_layers.Block`)
    z   = norm(h_n) W_out  (W_out = E^T when embeddings are tied), in float32;
    z  <- cap tanh(z / cap) with a final logit soft cap (Gemma 2)                      (eq. 4)

KV cache: an explicit pytree `KVCache` preallocated to `max_len` slots with per-layer keys and
values [B, K, max_len, D] (head-major: the key/value heads are batch axes of the attention
products, which then read the cache without a transpose), slot validity and positions
[B, max_len], and the next slot `index`.
A call with a cache writes its L new keys at slots index .. index+L-1 and advances the index,
so a sampler can prefill a prompt and then decode one token at a time inside `lax.while_loop`
(the caller keeps index + L <= max_len; slots are not bounds-checked under jit).
`extend_cache` appends empty slots, so that a prompt can be prefilled into a cache of exactly
its length (attention then reads only its keys) before decoding.

Layers are a plain per-layer list (not `nnx.scan`): each layer's attention type (local or
global) stays static, HF tensors map one-to-one to parameters, and loading fills one tensor at a
time. Compile time grows with depth, which is acceptable at the sizes alignjax trains.

Sharding: `lm_sharding_rules()` gives rules for the one engine, `alignjax.parallel` (regex over
a path suffix, PartitionSpec tuple): FSDP over the hidden axis, tensor parallelism over
attention heads, the MLP width and the vocabulary. Matching suffixes, they shard parameters
and the Adam moments of a TrainState alike; a dimension the mesh axes do not divide (2 KV heads
over tensor=4) is replicated and logged. `lm_param_shardings` / `spec_for` apply them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec

from alignjax import parallel
from alignjax.kernels import skinny_matmul
from alignjax.models.lm_config import LMConfig, lm_config_from_hf, lm_config_to_hf
from alignjax.models.lm_layers import Block, Dense, Norm, normal_init, rope_sin_cos

__all__ = [
    "KVCache",
    "LMConfig",
    "LM_SHARDING_RULES",
    "TransformerLM",
    "extend_cache",
    "forward",
    "init_cache",
    "lm_config_from_hf",
    "lm_config_to_hf",
    "lm_param_shardings",
    "lm_sharding_rules",
    "positions_from_mask",
    "spec_for",
]


@struct.dataclass
class KVCache:
  """Preallocated key/value cache (see module docstring)."""

  keys: tuple[jax.Array, ...]  # per layer [B, K, S, D]
  values: tuple[jax.Array, ...]  # per layer [B, K, S, D]
  valid: jax.Array  # [B, S] bool: slot holds a real token
  positions: jax.Array  # [B, S] int32: position of the token in each slot
  index: jax.Array  # [] int32: next slot to write

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]


def init_cache(config: LMConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache with `max_len` slots (at most config.max_position_embeddings)."""
  if max_len > config.max_position_embeddings:
    raise ValueError(
        f"init_cache: max_len={max_len} exceeds the model's "
        f"max_position_embeddings={config.max_position_embeddings}"
    )
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(
      keys=zeros,
      values=tuple(jnp.zeros(shape, dtype) for _ in zeros),
      valid=jnp.zeros((batch_size, max_len), bool),
      positions=jnp.zeros((batch_size, max_len), jnp.int32),
      index=jnp.zeros((), jnp.int32),
  )


def extend_cache(cache: KVCache, max_len: int) -> KVCache:
  """`cache` with `max_len` >= cache.max_len slots, the new ones empty (zero keys and values,
  invalid). A sampler prefills a cache of exactly the prompt's length (attention then reads
  only the prompt's keys) and extends it before decoding."""
  extra = max_len - cache.max_len
  if extra < 0:
    raise ValueError(
        f"extend_cache: max_len={max_len} is smaller than the cache's " f"{cache.max_len} slots"
    )

  def pad(x, axis):  # zeros with x written at slot 0
    shape = x.shape[:axis] + (max_len,) + x.shape[axis + 1 :]
    return jax.lax.dynamic_update_slice(jnp.zeros(shape, x.dtype), x, (0,) * x.ndim)

  return KVCache(
      keys=tuple(pad(k, 2) for k in cache.keys),
      values=tuple(pad(v, 2) for v in cache.values),
      valid=pad(cache.valid, 1),
      positions=pad(cache.positions, 1),
      index=cache.index,
  )


def positions_from_mask(valid) -> jax.Array:
  """Positions of left-padded tokens (eq. 1): [B, L] bool -> int32."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


class Embedding(nnx.Module):

  def __init__(self, num: int, size: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(normal_init(rngs.params(), (num, size), dtype))

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0)


class TransformerLM(nnx.Module):
  """Decoder-only transformer; holds only `nnx.Param` state (see module docstring)."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    dtype = jnp.dtype(c.dtype)
    self.embed = Embedding(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs)
    self.pos_embed = (
        Embedding(c.max_position_embeddings, c.hidden_size, dtype=dtype, rngs=rngs)
        if c.position_embedding == "learned"
        else None
    )
    self.layers = nnx.List([Block(c, dtype=dtype, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = Norm(
        c.hidden_size, kind=c.norm, eps=c.norm_eps, offset=c.norm_offset, dtype=dtype
    )
    self.lm_head = (
        None
        if c.tie_embeddings
        else Dense((c.hidden_size,), (c.vocab_size,), bias=False, dtype=dtype, rngs=rngs)
    )

  def __call__(self, tokens, positions=None, valid=None, cache: KVCache | None = None):
    """Logits [B, L, V] float32 and the updated cache (None without one)."""
    hidden, cache = self.hidden_states(tokens, positions, valid, cache)
    return self.logits(hidden), cache

  def hidden_states(self, tokens, positions=None, valid=None, cache: KVCache | None = None):
    """Final-norm hidden states [B, L, H] (for chunked scoring) and the updated cache."""
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"TransformerLM: tokens must be [batch, length], got shape {tokens.shape}")
    b, l = tokens.shape
    limit = c.max_position_embeddings if cache is None else cache.max_len
    if l > limit:
      what = "max_position_embeddings" if cache is None else "the KV cache max_len"
      raise ValueError(f"TransformerLM: sequence length {l} exceeds {what}={limit}")
    valid = jnp.ones((b, l), bool) if valid is None else valid.astype(bool)
    if positions is None:
      if cache is not None:
        raise ValueError("TransformerLM: positions are required when a KV cache is given")
      positions = positions_from_mask(valid)
    positions = positions.astype(jnp.int32)

    if cache is None:  # keys are the inputs themselves
      key_valid, key_pos, index = valid, positions, None
      q_slot, k_slot = jnp.arange(l), jnp.arange(l)
    else:
      index = cache.index
      key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
      key_pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
      q_slot, k_slot = index + jnp.arange(l), jnp.arange(cache.max_len)
    allowed = key_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])  # eq. 2
    local = (
        allowed & (positions[:, :, None] - key_pos[:, None, :] < c.sliding_window)
        if c.local_layers
        else None
    )

    x = self.embed(tokens)  # eq. 3
    if c.embed_scale:
      x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    rope = rope_sin_cos(positions, c.inv_freq()) if c.position_embedding == "rope" else None

    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      x, (k, v) = layer(x, local if i in c.local_layers else allowed, rope, kv, index)
      new_k.append(k)
      new_v.append(v)
    x = self.final_norm(x)
    if cache is not None:
      cache = KVCache(
          keys=tuple(new_k),
          values=tuple(new_v),
          valid=key_valid,
          positions=key_pos,
          index=index + l,
      )
    return x, cache

  def logits(self, hidden):
    """Hidden states [..., H] -> logits [..., V] float32 (eq. 4)."""
    if self.lm_head is None:
      z = jnp.einsum(
          "...h,vh->...v", hidden, self.embed.embedding[...], preferred_element_type=jnp.float32
      )
    else:
      z = skinny_matmul.matmul(
          hidden,
          self.lm_head.kernel[...],
          fallback=lambda h, k: jnp.einsum(
              "...h,hv->...v", h, k, preferred_element_type=jnp.float32
          ),
      )
    cap = self.config.final_logit_softcap
    return z if cap is None else cap * jnp.tanh(z / cap)


def forward(graphdef, params, tokens, positions=None, valid=None, cache=None):
  """Pure form of `TransformerLM.__call__` over split state (for jit)."""
  return nnx.merge(graphdef, params)(tokens, positions, valid, cache)


# ---------------------------------------------------------------------------------------------
# Sharding


def lm_sharding_rules(fsdp=("fsdp",), tensor="tensor") -> list[parallel.Rule]:
  """The LM's rules for the `alignjax.parallel` engine (module docstring). They match path
  suffixes, so they shard a parameter state, a `TrainState` ("params/...") and its optimizer
  moments ("opt_state/.../mu/...") alike; every rule replicates a dimension the mesh axes do
  not divide (`indivisible="replicate"`). `fsdp` may be ("data", "fsdp") to shard parameters
  over every data-parallel device. (`LM_SHARDING_RULES`, the default, is their tuple: hashable,
  so it can be a jit static argument.)"""
  f, t = tuple(fsdp), tensor
  layer = r"(^|/)layers/\d+/"
  rules = [
      (r"(^|/)embed/embedding$", (t, f)),
      (r"(^|/)pos_embed/embedding$", (None, f)),
      (layer + r"attn/(q|k|v)/kernel$", (f, t, None)),
      (layer + r"attn/(q|k|v)/bias$", (t, None)),
      (layer + r"attn/o/kernel$", (t, None, f)),
      (layer + r"mlp/(gate|up)/kernel$", (f, t)),
      (layer + r"mlp/(gate|up)/bias$", (t,)),
      (layer + r"mlp/down/kernel$", (t, f)),
      (r"(^|/)lm_head/kernel$", (f, t)),
  ]  # anything else (norms, output biases, step counters, keys): replicated
  return [parallel.Rule(pattern, spec, "replicate") for pattern, spec in rules]


LM_SHARDING_RULES = tuple(lm_sharding_rules())


def spec_for(path: str, shape, mesh, rules=LM_SHARDING_RULES) -> PartitionSpec:
  """`alignjax.parallel.spec_for` with the LM rules as default (thin wrapper)."""
  return parallel.spec_for(path, shape, mesh, rules)


def lm_param_shardings(abstract_state, mesh, rules=LM_SHARDING_RULES):
  """`alignjax.parallel.param_shardings` with the LM rules as default (thin wrapper): a
  NamedSharding per leaf of an (abstract) `nnx.State` or `TrainState`, same tree structure."""
  return parallel.param_shardings(abstract_state, mesh, rules)
