"""Functional LoRA (low-rank adaptation) on a parameter pytree (an nnx State or nested dicts).

A kernel W is stored [in..., out...]: its first `num_in` axes are the layer's input. The LM's
`Dense` kernels record it (q/k/v [H, N, D] and MLP/lm_head [in, out] have num_in = 1, o
[N, D, H] has num_in = 2); for nnx.Linear and nnx.Conv (conv [kh, kw, in, out], the patch is
the input) it is every axis but the last, the default. For every targeted kernel LoRA keeps

    A in R^{fan_in x r},  B in R^{r x fan_out},
    fan_in = prod(W.shape[:num_in]),  fan_out = prod(W.shape[num_in:])                 (eq. 1)

and the merged kernel is, with s = alpha / r (rsLoRA: s = alpha / sqrt(r)),

    W' = W + s * reshape(A @ B, W.shape)                                              (eq. 2)

Row-major flattening of [in..., out...] to [fan_in, fan_out] is what a torch Linear sees as
[out, in] transposed (`convert.lm_keys` "linear" and "linear_in2" layouts), so eq. 2 is PEFT's
W_hf + s * lora_B.weight @ lora_A.weight with lora_A.weight = A^T, lora_B.weight = B^T.
The parameter count is sum over targets of r (fan_in + fan_out). Init, as PEFT's:

    "kaiming"  (init_lora_weights=True): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e.
               kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, fan_in]                 (eq. 3)
    "gaussian" (init_lora_weights="gaussian"): A ~ N(0, std = 1/r)                      (eq. 4)
    B = 0 either way, so merge_lora(W, init_lora(W)) == W exactly.

The pytree of (A, B) pairs is what an optimizer trains; the base parameters are a separate,
frozen argument: gradients of a loss of `merge_lora(base, lora)` w.r.t. `lora` reach A and B
only (eq. 2 is linear in the base, which is left untouched).

`lora_params` is a plain dict {"/"-joined parameter path: {"a": A, "b": B}}, e.g.
{"layers/0/attn/q/kernel": {"a": ..., "b": ...}}; its own "/"-joined paths
("layers/0/attn/q/kernel/a") therefore extend the base paths, which keeps sharding rules simple.
The split point between in- and out-axes is recorded by A's shape (eq. 1), so merging needs no
extra information.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Mapping, Union

import jax
import jax.numpy as jnp
from flax import nnx

from alignjax.parallel import path_str

DEFAULT_TARGET = r"(^|/)kernel$"
INITS = ("kaiming", "gaussian")
# LM module names -> the path of their kernel in `TransformerLM` ({i}: layer index).
LM_MODULES = {
    "q": "layers/{i}/attn/q/kernel",
    "k": "layers/{i}/attn/k/kernel",
    "v": "layers/{i}/attn/v/kernel",
    "o": "layers/{i}/attn/o/kernel",
    "gate": "layers/{i}/mlp/gate/kernel",
    "up": "layers/{i}/mlp/up/kernel",
    "down": "layers/{i}/mlp/down/kernel",
    "lm_head": "lm_head/kernel",
}
DEFAULT_LM_MODULES = ("q", "k", "v", "o", "gate", "up", "down")

NumIn = Union[None, int, Mapping[str, int], Callable[[str, tuple], int]]


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


def dense_num_in(model: nnx.Module) -> dict[str, int]:
  """{kernel path: number of input axes} of every sub-module that records `num_in` (the LM's
  `lm_layers.Dense`), found by walking the module graph; works on abstract models too."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and isinstance(getattr(node, "num_in", None), int):
      if isinstance(getattr(node, "kernel", None), nnx.Variable):
        out["/".join(str(p) for p in path + ("kernel",))] = node.num_in
  return out


def _resolve_num_in(name: str, shape: tuple[int, ...], num_in: NumIn) -> int:
  if num_in is None:
    k = len(shape) - 1
  elif isinstance(num_in, Mapping):
    if name not in num_in:
      raise ValueError(
          f"init_lora: num_in mapping has no entry for target {name!r}; it covers "
          f"{sorted(num_in)[:20]}"
      )
    k = num_in[name]
  elif callable(num_in):
    k = num_in(name, shape)
  elif isinstance(num_in, int):
    k = num_in
  else:
    raise TypeError(
        f"init_lora: num_in={num_in!r} must be None, an int, a mapping path -> int or a "
        "callable (path, shape) -> int"
    )
  if not isinstance(k, int) or not 1 <= k < len(shape):
    raise ValueError(
        f"init_lora: {name}: num_in={k!r} for kernel shape {shape}; need an int in "
        f"[1, {len(shape) - 1}] (the number of leading input axes)"
    )
  return k


def fans(shape, num_in: int) -> tuple[int, int]:
  """(fan_in, fan_out) of a kernel [in..., out...] with `num_in` input axes (eq. 1)."""
  return math.prod(shape[:num_in]), math.prod(shape[num_in:])


def init_lora(
    params,
    rank: int,
    key: jax.Array,
    *,
    target: str = DEFAULT_TARGET,
    num_in: NumIn = None,
    init: str = "kaiming",
    dtype=None,
) -> dict[str, dict[str, jax.Array]]:
  """LoRA factors for every targeted kernel: A by eq. 3 or 4, B = 0 (eq. 1).

  Args:
    params: the (frozen) base parameters: an nnx State of Params or any pytree of arrays.
    rank: r > 0.
    key: PRNG key for A.
    target: regex searched in each '/'-joined parameter path (default: kernels).
    num_in: input axes of each kernel: None (all but the last: Linear and Conv kernels), an
      int for all targets, a mapping {path: int} (e.g. `dense_num_in(model)`) covering every
      target, or a callable (path, shape) -> int.
    init: "kaiming" (eq. 3, PEFT's default) or "gaussian" (eq. 4).
    dtype: dtype of A and B (default: the kernel's).

  Returns:
    {path: {"a": [fan_in, r], "b": [r, fan_out]}}.
  """
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f"init_lora: rank={rank!r} must be a positive int")
  if init not in INITS:
    raise ValueError(f"init_lora: init={init!r}; valid choices: {INITS}")
  targets = lora_targets(params, target)
  if not targets:
    names = [path_str(p) for p, _ in _leaves(params)]
    raise ValueError(
        f"init_lora: target regex {target!r} matches no parameter with ndim >= 2;"
        f" parameter paths: {names[:20]}{' ...' if len(names) > 20 else ''}"
    )
  dtypes = {path_str(p): leaf.dtype for p, leaf in _leaves(params)}
  names = sorted(targets)
  shapes = [fans(targets[n], _resolve_num_in(n, targets[n], num_in)) for n in names]
  a_all = _draw_a(key, tuple(s[0] for s in shapes), rank, init)  # one jitted draw for all
  lora = {}
  for name, a, (_, fan_out) in zip(names, a_all, shapes):
    dt = dtype or dtypes[name]
    lora[name] = {"a": a.astype(dt), "b": jnp.zeros((rank, fan_out), dt)}
  return lora


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_a(key, fan_ins: tuple[int, ...], rank: int, init: str) -> list[jax.Array]:
  """A_i [fan_in_i, rank] by eq. 3 or 4, from one flat draw (one compilation)."""
  n = sum(fan_ins) * rank
  if init == "kaiming":
    z = jax.random.uniform(key, (n,), jnp.float32, -1.0, 1.0)
  else:
    z = jax.random.normal(key, (n,), jnp.float32) / rank
  out, offset = [], 0
  for fan_in in fan_ins:
    a = z[offset : offset + fan_in * rank].reshape(fan_in, rank)
    out.append(a / math.sqrt(fan_in) if init == "kaiming" else a)
    offset += fan_in * rank
  return out


def lm_lora_plan(model: nnx.Module, modules=DEFAULT_LM_MODULES) -> tuple[str, dict[str, int]]:
  """(target regex, num_in) that select the named projections (`LM_MODULES`) of every layer
  of a `TransformerLM` over each `Dense` kernel's real input axes (eq. 1), for `init_lora`.
  Raises, naming the available modules, for a name that is unknown or selects no kernel of
  this model (e.g. "gate" without a gated MLP)."""
  modules = (modules,) if isinstance(modules, str) else tuple(modules)
  if not modules:
    raise ValueError(f"LoRA targets: no modules given; choose from {tuple(LM_MODULES)}")
  unknown = [m for m in modules if m not in LM_MODULES]
  if unknown:
    raise ValueError(f"LoRA targets: unknown module names {unknown}; valid: {tuple(LM_MODULES)}")
  num_in = dense_num_in(model)
  present = {m for m in LM_MODULES if any(_module_regex(m).fullmatch(n) for n in num_in)}
  absent = [m for m in modules if m not in present]
  if absent:
    raise ValueError(
        f"LoRA targets {list(modules)}: {absent} select no kernel of this model; "
        f"available module names: {sorted(present, key=list(LM_MODULES).index)}"
    )
  return "^(" + "|".join(_module_regex(m).pattern for m in modules) + ")$", num_in


def init_lm_lora(
    model: nnx.Module,
    rank: int,
    key: jax.Array,
    *,
    modules=DEFAULT_LM_MODULES,
    init: str = "kaiming",
    dtype=None,
) -> dict[str, dict[str, jax.Array]]:
  """LoRA of a `TransformerLM` on the named projections of every layer (`lm_lora_plan`)."""
  target, num_in = lm_lora_plan(model, modules)
  params = nnx.state(model, nnx.Param)
  return init_lora(params, rank, key, target=target, num_in=num_in, init=init, dtype=dtype)


def _module_regex(module: str) -> re.Pattern:
  return re.compile(re.escape(LM_MODULES[module]).replace(re.escape("{i}"), r"\d+"))


def lora_scale(rank: int, alpha: float | None = None, rslora: bool = False) -> float:
  """s of eq. 2: alpha / r (rsLoRA: alpha / sqrt(r)); alpha=None means s = 1."""
  if alpha is None:
    return 1.0
  return alpha / (math.sqrt(rank) if rslora else rank)


def lora_delta(
    pair: dict[str, jax.Array], shape, alpha: float | None = None, *, rslora: bool = False
) -> jax.Array:
  """s * reshape(A @ B, shape) (eq. 2); alpha=None means s = 1."""
  a, b = pair["a"], pair["b"]
  return (lora_scale(a.shape[-1], alpha, rslora) * (a @ b)).reshape(shape)


def _check_pair(name: str, shape: tuple[int, ...], pair) -> None:
  a, b = pair["a"], pair["b"]
  splits = [fans(shape, k) for k in range(1, len(shape))]
  ok = a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]
  if not ok or (a.shape[0], b.shape[1]) not in splits:
    raise ValueError(
        f"merge_lora: {name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit kernel "
        f"{shape} (need A [fan_in, r], B [r, fan_out] with (fan_in, fan_out) one of {splits})"
    )


def merge_lora(base_params, lora_params, *, alpha: float | None = None, rslora: bool = False):
  """Base parameters with every LoRA pair merged in (eq. 2); pure and jittable.

  The result has the structure of `base_params` (an nnx State stays an nnx State and can be
  given to `nnx.merge`). alpha=None means s = 1. Raises if a LoRA entry names no parameter or
  its factors fit no split of the kernel into [in..., out...] axes.
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
    _check_pair(name, tuple(w.shape), pair)
    out.append(w + lora_delta(pair, w.shape, alpha, rslora=rslora).astype(w.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def lora_param_count(lora_params) -> int:
  """Number of scalars in the LoRA factors: sum over targets of r * (fan_in + fan_out)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(lora_params))


def merged_model(
    graphdef: nnx.GraphDef, base_params, lora_params, *, alpha=None, rslora: bool = False
) -> nnx.Module:
  """nnx.merge(graphdef, merge_lora(base, lora)): a model whose kernels include eq. 2."""
  return nnx.merge(graphdef, merge_lora(base_params, lora_params, alpha=alpha, rslora=rslora))
