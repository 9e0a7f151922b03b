"""Functional LoRA (low-rank adaptation) on a parameter pytree (an nnx State or nested dicts).

For every targeted kernel W (default: every leaf named `kernel` with ndim >= 2, i.e. the
kernels of Linear and Conv layers) LoRA keeps a pair

    A in R^{fan_in x r},  B in R^{r x fan_out},   fan_in = prod(W.shape[:-1]),
    fan_out = W.shape[-1]   (a conv kernel [kh, kw, in, out] is viewed as [kh*kw*in, out])

and the merged kernel is

    W' = W + (alpha / r) * reshape(A @ B, W.shape)                                (eq. 1)

A is drawn from N(0, 1/fan_in) and B = 0 at init, so merge_lora(W, init_lora(W)) == W exactly.
The pytree of (A, B) pairs is what an optimizer trains; the base parameters are a separate,
frozen argument: gradients of a loss of `merge_lora(base, lora)` w.r.t. `lora` reach A and B
only (eq. 1 is linear in the base, which is left untouched).

`lora_params` is a plain dict {"/"-joined parameter path: {"a": A, "b": B}}, e.g.
{"down/0/conv1/kernel": {"a": ..., "b": ...}}; its own "/"-joined paths
("down/0/conv1/kernel/a") therefore extend the base paths, which keeps sharding rules simple.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_TARGET = r"(^|/)kernel$"


def path_str(path) -> str:
  """'/'-joined name of a jax tree path, skipping the `.value` attribute of nnx Variables."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _leaves(params):
  return jax.tree_util.tree_flatten_with_path(params)[0]


def lora_targets(params, target: str = DEFAULT_TARGET) -> dict[str, tuple[int, ...]]:
  """{path: kernel shape} of every leaf with ndim >= 2 whose '/'-path matches `target`."""
  pattern = re.compile(target)
  out = {}
  for path, leaf in _leaves(params):
    name = path_str(path)
    if jnp.ndim(leaf) >= 2 and pattern.search(name):
      out[name] = tuple(leaf.shape)
  return out


def init_lora(
    params, rank: int, key: jax.Array, *, target: str = DEFAULT_TARGET, dtype=None
) -> dict[str, dict[str, jax.Array]]:
  """LoRA factors for every targeted kernel: A ~ N(0, 1/fan_in), B = 0 (eq. 1).

  Args:
    params: the (frozen) base parameters: an nnx State of Params or any pytree of arrays.
    rank: r > 0.
    key: PRNG key for A.
    target: regex searched in each '/'-joined parameter path (default: kernels).
    dtype: dtype of A and B (default: the kernel's).

  Returns:
    {path: {"a": [fan_in, r], "b": [r, fan_out]}}.
  """
  if not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"init_lora: rank={rank!r} must be a positive int")
  targets = lora_targets(params, target)
  if not targets:
    names = [path_str(p) for p, _ in _leaves(params)]
    raise ValueError(
        f"init_lora: target regex {target!r} matches no parameter with ndim >= 2;"
        f" parameter paths: {names[:20]}{' ...' if len(names) > 20 else ''}"
    )
  dtypes = {path_str(p): leaf.dtype for p, leaf in _leaves(params)}
  names = sorted(targets)
  fan_ins = tuple(math.prod(targets[n][:-1]) for n in names)
  a_all = _draw_a(key, fan_ins, rank)  # one jitted draw for all targets
  lora = {}
  for name, a in zip(names, a_all):
    dt = dtype or dtypes[name]
    lora[name] = {"a": a.astype(dt), "b": jnp.zeros((rank, targets[name][-1]), dt)}
  return lora


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_a(key, fan_ins: tuple[int, ...], rank: int) -> list[jax.Array]:
  """A_i ~ N(0, 1/fan_in_i) [fan_in_i, rank], from one normal draw (one compilation)."""
  z = jax.random.normal(key, (sum(fan_ins) * rank,), jnp.float32)
  out, offset = [], 0
  for fan_in in fan_ins:
    out.append(z[offset : offset + fan_in * rank].reshape(fan_in, rank) / math.sqrt(fan_in))
    offset += fan_in * rank
  return out


def lora_delta(pair: dict[str, jax.Array], shape, alpha: float | None = None) -> jax.Array:
  """(alpha / r) * reshape(A @ B, shape) (eq. 1); alpha=None means alpha = r (scale 1)."""
  a, b = pair["a"], pair["b"]
  rank = a.shape[-1]
  scale = 1.0 if alpha is None else alpha / rank
  return (scale * (a @ b)).reshape(shape)


def merge_lora(base_params, lora_params, *, alpha: float | None = None):
  """Base parameters with every LoRA pair merged in (eq. 1); pure and jittable.

  The result has the structure of `base_params` (an nnx State stays an nnx State and can be
  given to `nnx.merge`). alpha=None means alpha = r, i.e. scale 1.
  Raises if a LoRA entry names no parameter or has inconsistent shapes.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(base_params)
  names = [path_str(p) for p, _ in leaves]
  unknown = sorted(set(lora_params) - set(names))
  if unknown:
    raise ValueError(f"merge_lora: LoRA entries {unknown} name no base parameter")
  out = []
  for name, (_, w) in zip(names, leaves):
    pair = lora_params.get(name)
    if pair is None:
      out.append(w)
      continue
    fan_in, fan_out = math.prod(w.shape[:-1]), w.shape[-1]
    if (
        pair["a"].shape[0] != fan_in
        or pair["b"].shape[-1] != fan_out
        or (pair["a"].shape[-1] != pair["b"].shape[0])
    ):
      raise ValueError(
          f"merge_lora: {name}: A {pair['a'].shape} / B {pair['b'].shape} do not "
          f"fit kernel {w.shape} (need A [{fan_in}, r], B [r, {fan_out}])"
      )
    out.append((w + lora_delta(pair, w.shape, alpha).astype(w.dtype)))
  return jax.tree_util.tree_unflatten(treedef, out)


def lora_param_count(lora_params) -> int:
  """Number of scalars in the LoRA factors: sum over targets of r * (fan_in + fan_out)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(lora_params))


def merged_model(graphdef: nnx.GraphDef, base_params, lora_params, *, alpha=None) -> nnx.Module:
  """nnx.merge(graphdef, merge_lora(base, lora)): a model whose kernels include eq. 1."""
  return nnx.merge(graphdef, merge_lora(base_params, lora_params, alpha=alpha))
