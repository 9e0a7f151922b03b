"""Finite checks: a run that blows up stops (or skips the update) instead of saving garbage.

Every training step of alignjax reports, with its new state, one int32 on the device: a bit
mask of the quantities that came out non-finite,

    (1)  mask = Σ_q 2^q · [¬ finite(q)],     q ∈ QUANTITIES = (loss, grad_norm, params, opt_state)
    (2)  finite(tree) = ∧_i ∧_j isfinite(x_ij)   over every floating (or complex) leaf x_i,

so the host reads a single scalar per step (it already waits for the step's metrics). `loss`
and `grad_norm` are the step's metrics of those names where it reports them; `params` and
`opt_state` are the *updated* trainable parameters and optimizer moments.

What the run does with a non-zero mask is the config's `finite` section (`config()`):

  * policy "stop" (default): the run raises NonFiniteError naming the step, the quantities
    and the last good checkpoint, before it saves, exports or summarises anything; the state
    with the non-finite values is never written (`Checkpointer.maybe_save` refuses it too).
  * policy "skip": the step keeps its input state instead (3), the host counts the skip and
    the run goes on; after `max_consecutive_skips` skipped steps in a row it stops as above.

    (3)  state' = new_state if mask = 0 else state           (inside the jitted step)

`guard(step_fn, policy)` wraps a step `(state, *args) -> (state, metrics)` into
`(state, *args) -> (state, metrics, mask)` implementing (1)-(3); `Monitor` is the host side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignjax import configs

POLICIES = ("stop", "skip")
QUANTITIES = ("loss", "grad_norm", "params", "opt_state")


class NonFiniteError(RuntimeError):
  """A training quantity became NaN or infinite; the message names the step and the quantity."""


def config(policy: str = "stop", max_consecutive_skips: int = 3) -> ml_collections.ConfigDict:
  """The `finite` section of an experiment config (see the module docstring)."""
  return ml_collections.ConfigDict(dict(policy=policy, max_consecutive_skips=max_consecutive_skips))


def validate_config(config_: Any, path: str = "finite") -> None:
  """`config.<path>.policy` is one of POLICIES and `max_consecutive_skips` an int >= 1."""
  configs.check_choice(config_, f"{path}.policy", POLICIES)
  configs.check_integer(config_, f"{path}.max_consecutive_skips")
  configs.check_positive(config_, f"{path}.max_consecutive_skips")


def _is_inexact(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def tree_finite(tree: Any) -> jax.Array:
  """Eq. 2: a bool scalar, True when every floating leaf of `tree` is finite; jittable."""
  leaves = [jnp.asarray(x) if isinstance(x, float) else x for x in jax.tree_util.tree_leaves(tree)]
  flags = [jnp.all(jnp.isfinite(x)) for x in leaves if _is_inexact(x)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def nonfinite_mask(metrics: Mapping[str, Any], params: Any = None, opt_state: Any = None):
  """Eq. 1 for a step's metrics and its updated parameters and optimizer state.

  An int32 scalar, 0 when all are finite; quantities that are None are not checked.
  """
  values = {
      "loss": metrics.get("loss"),
      "grad_norm": metrics.get("grad_norm"),
      "params": params,
      "opt_state": opt_state,
  }
  mask = jnp.zeros((), jnp.int32)
  for bit, name in enumerate(QUANTITIES):
    if values[name] is not None:
      mask = mask | jnp.where(tree_finite(values[name]), 0, 1 << bit).astype(jnp.int32)
  return mask


def describe(mask: int) -> list[str]:
  """The names of the quantities set in a mask of eq. 1."""
  return [name for bit, name in enumerate(QUANTITIES) if int(mask) >> bit & 1]


def _train_state_parts(state) -> tuple[Any, Any]:
  return state.params, state.opt_state


def select(mask: jax.Array, new: Any, old: Any) -> Any:
  """Eq. 3: `new` where the mask is 0, else `old` (pytrees of one structure); jittable."""
  return jax.lax.cond(mask == 0, lambda: new, lambda: old)


def guard(
    step_fn: Callable,
    policy: str = "stop",
    parts: Callable[[Any], tuple[Any, Any]] = _train_state_parts,
) -> Callable:
  """`(state, *args) -> (state, metrics)` into `(state, *args) -> (state, metrics, mask)`.

  The mask is eq. 1 of the step's metrics and of `parts(new_state)` = (params, opt_state)
  (default: a TrainState's fields); with policy "skip" a step with a non-zero mask returns
  its input state (eq. 3). Jit the result as the step was jitted (donating the state is
  fine: the selection happens inside the program).
  """
  if policy not in POLICIES:
    raise ValueError(f"finite policy {policy!r}: valid choices are {POLICIES}")

  def guarded(state, *args, **kwargs):
    new_state, metrics = step_fn(state, *args, **kwargs)
    mask = nonfinite_mask(metrics, *parts(new_state))
    if policy == "skip":
      new_state = select(mask, new_state, state)
    return new_state, metrics, mask

  return guarded


class Monitor:
  """The host side of the finite checks: `check(step, mask)` after every guarded step.

  Args:
    policy: "stop" or "skip" (module docstring).
    max_consecutive_skips: with "skip", the run stops at this many skipped steps in a row.
    unit: what a step is called in messages ("round", "update", "iteration", "step").
    last_good: a callable returning a description of the last good checkpoint (e.g. its step
      directory), called only when the run stops.
    skipped, consecutive: counts carried over from a checkpoint (`state_dict()`).
  """

  def __init__(
      self,
      policy: str = "stop",
      max_consecutive_skips: int = 3,
      *,
      unit: str = "step",
      last_good: Callable[[], str] | None = None,
      skipped: int = 0,
      consecutive: int = 0,
  ):
    if policy not in POLICIES:
      raise ValueError(f"finite policy {policy!r}: valid choices are {POLICIES}")
    self.policy = policy
    self.max_consecutive_skips = int(max_consecutive_skips)
    self.unit = unit
    self.last_good = last_good
    self.skipped = int(skipped)
    self.consecutive = int(consecutive)

  @classmethod
  def from_config(cls, finite_config, host_state: Mapping | None = None, **kwargs) -> "Monitor":
    counts = dict((host_state or {}).get("finite") or {})
    return cls(
        finite_config.policy,
        finite_config.max_consecutive_skips,
        skipped=counts.get("skipped", 0),
        consecutive=counts.get("consecutive", 0),
        **kwargs,
    )

  def state_dict(self) -> dict:
    """The skip counts, for the checkpoint's host state."""
    return {"skipped": self.skipped, "consecutive": self.consecutive}

  def _stop(self, step: int, names: list[str], why: str) -> NonFiniteError:
    where = self.last_good() if self.last_good is not None else "none recorded"
    return NonFiniteError(
        f"{self.unit} {step}: non-finite {', '.join(names)} ({why}). The run stopped "
        f"without saving, exporting or summarising this state; last good checkpoint: {where}. "
        "Lower the learning rate or resume from that checkpoint; config.finite.policy='skip' "
        "skips such updates instead."
    )

  def check(self, step: int, mask: Any) -> bool:
    """True when the step's update was applied; False when it was skipped.

    Raises NonFiniteError when the policy is "stop" and the mask is non-zero, or when the
    "skip" policy has skipped `max_consecutive_skips` steps in a row.
    """
    mask = int(np.asarray(jax.device_get(mask)))
    if mask == 0:
      self.consecutive = 0
      return True
    names = describe(mask)
    if self.policy == "stop":
      raise self._stop(step, names, "config.finite.policy='stop'")
    self.skipped += 1
    self.consecutive += 1
    if self.consecutive >= self.max_consecutive_skips:
      raise self._stop(
          step,
          names,
          f"{self.consecutive} {self.unit}s in a row skipped, "
          f"config.finite.max_consecutive_skips={self.max_consecutive_skips}",
      )
    return False

  def check_steps(self, first_step: int, masks) -> int:
    """`check` for consecutive steps first_step, first_step + 1, ... (masks read in one
    transfer); returns how many of them were applied."""
    masks = np.asarray(jax.device_get(list(masks))).reshape(-1)
    return sum(self.check(first_step + i, m) for i, m in enumerate(masks))


def check_host_tree(tree: Any, what: str) -> None:
  """Raises NonFiniteError naming the leaves of a host (numpy) tree that are not finite."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
      bad.append(jax.tree_util.keystr(path))
  if bad:
    raise NonFiniteError(
        f"{what}: non-finite values in {len(bad)} leaves ({', '.join(bad[:5])}); refusing to "
        "write them"
    )
