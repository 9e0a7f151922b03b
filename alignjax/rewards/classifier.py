"""Classifier log-probability reward (differentiable).

For a classifier with logits z = logits_fn(images) [B, K] and a target class y_b per image:

    (1)  log p(y | x) = z_y - logsumexp_k z_k            (log_softmax, in nats, <= 0)
    (2)  r_b = log p(y_b | x_b),   y_b = target (a fixed class) or prompts[b] (the
                                   conditioning class id of sample b) when target is None.

The reward is a pure JAX function of the images, so jax.grad(r) w.r.t. the images exists
(DRaFT, Adjoint Matching). Frozen classifier parameters: to pass them as arguments of a
jitted step instead of baking them in as constants, build the reward inside the step,
e.g. `classifier_log_prob(lambda im: nnx.merge(graphdef, frozen_params)(im))`.

Out-of-range class ids: a fixed `target` is checked when the reward is built; prompts that
are concrete arrays are checked on every call; inside `jax.jit` (traced prompts) a class
id outside 0..K-1 cannot raise and yields NaN (out-of-bounds gather fills with NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignjax.rewards.base import Reward

__all__ = ["class_log_prob", "classifier_log_prob"]


def class_log_prob(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """log_softmax(logits)[b, labels[b]] (eq. 1) in float32; logits [B, K], labels [B] int."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  labels = jnp.asarray(labels)[:, None]
  return jnp.take_along_axis(log_probs, labels, axis=-1, mode="fill", fill_value=jnp.nan)[:, 0]


def _check_class_id(value: Any, num_classes: int, what: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{what} must be an integer class id in 0..{num_classes - 1}; got {value!r}.")
  if not 0 <= value < num_classes:
    raise ValueError(f"{what}={value} is out of range; valid class ids are 0..{num_classes - 1}.")


def classifier_log_prob(
    logits_fn: Callable[[jax.Array], jax.Array],
    target: int | None = None,
    *,
    num_classes: int = 10,
) -> Reward:
  """Differentiable reward log p(y | images) under a classifier (eq. 2).

  Args:
    logits_fn: images [B, H, W, C] in [0, 1] -> logits [B, num_classes]; pure JAX.
    target: a fixed class id in 0..num_classes-1, or None to use each sample's prompt
      (its integer conditioning class id, prompts [B]).
    num_classes: number of classifier classes (10 for the digits classifier); the logits'
      last dimension is checked against it.
  Returns:
    Reward named "classifier_log_prob" (target None) or "classifier_log_prob_<target>".
  """
  if not callable(logits_fn):
    raise TypeError(
        f"classifier_log_prob: logits_fn must be callable; got {type(logits_fn).__name__}."
    )
  if (
      isinstance(num_classes, bool)
      or not isinstance(num_classes, (int, np.integer))
      or num_classes < 2
  ):
    raise ValueError(
        f"classifier_log_prob: num_classes must be an integer >= 2; got {num_classes!r}."
    )
  if target is not None:
    _check_class_id(target, num_classes, "classifier_log_prob: target")

  def fn(images, prompts):
    if target is None:
      if prompts is None:
        raise ValueError(
            "classifier_log_prob(target=None) scores each image's prompt class, so prompts "
            "must be int class ids [B]; got None. Pass prompts or fix a target."
        )
      labels = prompts if isinstance(prompts, jax.core.Tracer) else np.asarray(prompts)
      if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"classifier_log_prob: prompts must be int class ids [B] in 0..{num_classes - 1}; "
            f"got dtype {jnp.result_type(labels)}."
        )
      if jnp.ndim(labels) != 1:
        raise ValueError(
            f"classifier_log_prob: prompts must be int class ids of shape [B]; got shape "
            f"{jnp.shape(labels)}."
        )
      if isinstance(labels, np.ndarray):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
          raise ValueError(
              f"classifier_log_prob: prompt class ids {sorted(set(bad.tolist()))} are out of "
              f"range; valid class ids are 0..{num_classes - 1}."
          )
    else:
      labels = jnp.full((jnp.shape(images)[0],), target, dtype=jnp.int32)
    logits = logits_fn(images)
    if jnp.shape(logits) != (jnp.shape(images)[0], num_classes):
      raise ValueError(
          f"classifier_log_prob: logits_fn must return logits [B, {num_classes}] = "
          f"[{jnp.shape(images)[0]}, {num_classes}]; got shape {jnp.shape(logits)}."
      )
    return class_log_prob(logits, labels)  # eq. 2

  name = "classifier_log_prob" if target is None else f"classifier_log_prob_{int(target)}"
  return Reward(name=name, fn=fn, differentiable=True)
