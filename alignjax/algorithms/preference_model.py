r"""Training reward models (Bradley–Terry) and pairwise preference models on preference pairs.

Data: pairs (x, a, b) with a label p = P(a ≻ b | x) ∈ [0, 1] (1: a chosen, 0: b chosen, or a
soft label, e.g. an annotator average), as `PreferencePairs` token batches (prompts [B, P]
left-padded, responses [B, N] with their valid masks).

Bradley–Terry (Bradley & Terry 1952; the reward model of RLHF, Ouyang et al. 2022): with
Δ = r(x, y_c) − r(x, y_r) for a chosen y_c and a rejected y_r,

  (1)  ℓ_BT = −p log σ(Δ) − (1 − p) log σ(−Δ)      (p = 1 by default: −log σ(Δ)).

Preference models (`alignjax.models.heads`: pairwise eq. 5, GPM eq. 6) give an antisymmetric
logit d(x, a, b) = −d(x, b, a) directly; their loss is the same binary cross-entropy on d,

  (2)  ℓ_pref = −p log σ(d) − (1 − p) log σ(−d).

Both are weighted means over the batch, with optional weights w ≥ 0,

  (3)  L = Σ_b w_b ℓ_b / Σ_b w_b   (0 when all weights are 0).

The minimiser of (1) in expectation is σ(Δ) = P(y_c ≻ y_r): with BT-generated labels a
flexible reward recovers the true one up to a constant. (2) can fit any antisymmetric P, in
particular cyclic (intransitive) preferences that no reward can: on a tournament where every
item beats as many items as it loses to, every reward ranks about half the pairs wrong.

Held-out evaluation (`evaluate_accuracy`), on pairs never trained on, with labels p:

  (4)  accuracy = mean_b ( [d_b > 0] p_b + [d_b < 0] (1 − p_b) + ½ [d_b = 0] ),
  (5)  log-likelihood = mean_b ( p_b log σ(d_b) + (1 − p_b) log σ(−d_b) ) = −mean_b ℓ_b,

(4) is the usual accuracy for hard labels and its expectation under the label for soft ones.

Train steps are pure functions of (TrainState, batch) over split NNX state (`nnx.split`),
jitted with the state donated; `train_reward_model` / `train_preference_model` are the host
loops over minibatches drawn with a seeded generator, evaluating held-out pairs as they go.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from alignjax.models import heads
from alignjax.training import OptimizerConfig, TrainState, make_optimizer

__all__ = [
    "PreferencePairs",
    "TrainResult",
    "bradley_terry_loss",
    "evaluate_accuracy",
    "preference_loss",
    "preference_train_step",
    "reward_train_step",
    "train_preference_model",
    "train_reward_model",
]


@struct.dataclass
class PreferencePairs:
  """A batch of labelled pairs; `labels` [B] = P(a ≻ b | prompt) in [0, 1]."""

  prompt_tokens: jax.Array  # [B, P] int, left-padded
  prompt_valid: jax.Array  # [B, P] bool
  a_tokens: jax.Array  # [B, N] int
  a_valid: jax.Array  # [B, N] bool
  b_tokens: jax.Array  # [B, N] int
  b_valid: jax.Array  # [B, N] bool
  labels: jax.Array  # [B] float

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, idx) -> "PreferencePairs":
    """The pairs at indices `idx` (host or device arrays)."""
    return jax.tree_util.tree_map(lambda x: x[idx], self)

  def check(self) -> "PreferencePairs":
    """Raises a ValueError naming the field whose shape or values are wrong."""
    b = self.labels.shape[0] if np.ndim(self.labels) == 1 else None
    if b is None:
      raise ValueError(f"PreferencePairs: labels must be [B], got shape {np.shape(self.labels)}")
    for name in ("prompt_tokens", "prompt_valid", "a_tokens", "a_valid", "b_tokens", "b_valid"):
      shape = np.shape(getattr(self, name))
      if len(shape) != 2 or shape[0] != b:
        raise ValueError(f"PreferencePairs: {name} must be [{b}, length], got shape {shape}")
    for t, v in (
        ("prompt_tokens", "prompt_valid"),
        ("a_tokens", "a_valid"),
        ("b_tokens", "b_valid"),
    ):
      if np.shape(getattr(self, t)) != np.shape(getattr(self, v)):
        raise ValueError(f"PreferencePairs: {t} and {v} shapes differ")
    if np.shape(self.a_tokens) != np.shape(self.b_tokens):
      raise ValueError(
          f"PreferencePairs: a_tokens {np.shape(self.a_tokens)} and b_tokens "
          f"{np.shape(self.b_tokens)} must have the same shape (pad the shorter)"
      )
    labels = np.asarray(self.labels)
    if not np.all((labels >= 0) & (labels <= 1)):
      raise ValueError("PreferencePairs: labels must be probabilities P(a ≻ b) in [0, 1]")
    return self


# --------------------------------------------------------------------------- losses


def _f32(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _weighted_mean(losses, weights):
  if weights is None:
    return jnp.mean(losses)
  w = _f32(weights)
  total = jnp.sum(w)
  return jnp.where(total > 0, jnp.sum(w * losses) / jnp.where(total > 0, total, 1), 0.0)  # eq. 3


def _bce(logit, labels):
  """−p log σ(d) − (1 − p) log σ(−d), per example."""
  d = _f32(logit)
  p = jnp.ones_like(d) if labels is None else _f32(labels)
  return -(p * jax.nn.log_sigmoid(d) + (1 - p) * jax.nn.log_sigmoid(-d))


def bradley_terry_loss(r_chosen, r_rejected, labels=None, weights=None) -> jax.Array:
  """Eq. 1: mean −log σ(r_c − r_r) (soft labels p = P(chosen ≻ rejected) allowed)."""
  if jnp.shape(r_chosen) != jnp.shape(r_rejected):
    raise ValueError(
        f"bradley_terry_loss: r_chosen {jnp.shape(r_chosen)} and r_rejected "
        f"{jnp.shape(r_rejected)} must have the same shape"
    )
  return _weighted_mean(_bce(_f32(r_chosen) - _f32(r_rejected), labels), weights)


def preference_loss(p_logit, labels, weights=None) -> jax.Array:
  """Eq. 2: binary cross-entropy of the antisymmetric logit d against P(a ≻ b)."""
  if jnp.shape(p_logit) != jnp.shape(labels):
    raise ValueError(
        f"preference_loss: p_logit {jnp.shape(p_logit)} and labels {jnp.shape(labels)} "
        f"must have the same shape"
    )
  return _weighted_mean(_bce(p_logit, labels), weights)


# --------------------------------------------------------------------------- train steps


def _accuracy_terms(d, p):
  """Per-pair accuracy (eq. 4) and log-likelihood (eq. 5)."""
  d, p = _f32(d), _f32(p)
  acc = jnp.where(d > 0, p, jnp.where(d < 0, 1 - p, 0.5))
  return acc, -_bce(d, p)


def _make_step(graphdef, optimizer, loss_of):
  def step(state: TrainState, batch: PreferencePairs):
    def loss_fn(params):
      return loss_of(nnx.merge(graphdef, params), batch)

    (loss, d), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    acc, _ = _accuracy_terms(d, batch.labels)
    return state.apply_gradients(grads, optimizer), {"loss": loss, "accuracy": jnp.mean(acc)}

  return jax.jit(step, donate_argnums=0)


def reward_train_step(graphdef, optimizer: optax.GradientTransformation) -> Callable:
  """Jitted `step(state, batch) -> (state, metrics)` for a `RewardModel` (eq. 1); the two
  responses of each pair are scored in one batch of 2B sequences."""

  def loss_of(model, batch: PreferencePairs):
    x = tuple(jnp.concatenate([u, u]) for u in (batch.prompt_tokens, batch.prompt_valid))
    r = model.reward(
        *x,
        jnp.concatenate([batch.a_tokens, batch.b_tokens]),
        jnp.concatenate([batch.a_valid, batch.b_valid]),
    )
    b = batch.labels.shape[0]
    return bradley_terry_loss(r[:b], r[b:], batch.labels), r[:b] - r[b:]

  return _make_step(graphdef, optimizer, loss_of)


def preference_train_step(graphdef, optimizer: optax.GradientTransformation) -> Callable:
  """Jitted `step(state, batch) -> (state, metrics)` for a preference model (eq. 2)."""

  def loss_of(model, batch: PreferencePairs):
    d = model.logit(
        batch.prompt_tokens,
        batch.prompt_valid,
        batch.a_tokens,
        batch.a_valid,
        batch.b_tokens,
        batch.b_valid,
    )
    return preference_loss(d, batch.labels), d

  return _make_step(graphdef, optimizer, loss_of)


_jit_logit = jax.jit(heads.preference_logit, static_argnums=0)


def evaluate_accuracy(
    graphdef, params, pairs: PreferencePairs, *, batch_size: int = 256
) -> tuple[float, float]:
  """(held-out accuracy, mean log-likelihood) of any head model on `pairs` (eqs. 4, 5)."""
  pairs.check()
  accs, lls = [], []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs.take(np.arange(start, min(start + batch_size, len(pairs))))
    d = _jit_logit(
        graphdef,
        params,
        chunk.prompt_tokens,
        chunk.prompt_valid,
        chunk.a_tokens,
        chunk.a_valid,
        chunk.b_tokens,
        chunk.b_valid,
    )
    acc, ll = _accuracy_terms(d, chunk.labels)
    accs.append(np.asarray(acc))
    lls.append(np.asarray(ll))
  if not accs:
    raise ValueError("evaluate_accuracy: no pairs to evaluate")
  return float(np.mean(np.concatenate(accs))), float(np.mean(np.concatenate(lls)))


# --------------------------------------------------------------------------- host loops


@dataclasses.dataclass
class TrainResult:
  """The trained model and its curves: per-step train loss; (step, accuracy, log-lik) evals."""

  model: Any
  train_loss: list[float]
  evals: list[tuple[int, float, float]]

  @property
  def test_accuracy(self) -> float:
    return self.evals[-1][1]

  @property
  def test_log_likelihood(self) -> float:
    return self.evals[-1][2]


def _train(model, step_builder, train, test, *, steps, batch_size, optimizer, seed, eval_every):
  train, test = train.check(), test.check()
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
  if optimizer is None:
    optimizer = OptimizerConfig(learning_rate=1e-3)
  if not isinstance(optimizer, optax.GradientTransformation):
    optimizer = make_optimizer(optimizer)
  graphdef, params = nnx.split(model)  # head models hold only nnx.Param state
  state = TrainState.create(params, optimizer, jax.random.key(seed))
  step = step_builder(graphdef, optimizer)
  rng = np.random.default_rng(seed)
  host = jax.tree_util.tree_map(np.asarray, train)
  losses, evals = [], []
  for i in range(1, steps + 1):
    idx = rng.choice(len(host), size=min(batch_size, len(host)), replace=False)
    state, metrics = step(state, jax.tree_util.tree_map(jnp.asarray, host.take(idx)))
    losses.append(float(metrics["loss"]))
    if i == steps or (eval_every and i % eval_every == 0):
      evals.append((i, *evaluate_accuracy(graphdef, state.params, test)))
  return TrainResult(nnx.merge(graphdef, state.params), losses, evals)


def train_reward_model(
    model: heads.RewardModel,
    train: PreferencePairs,
    test: PreferencePairs,
    *,
    steps: int = 500,
    batch_size: int = 64,
    optimizer: OptimizerConfig | optax.GradientTransformation | None = None,
    seed: int = 0,
    eval_every: int = 0,
) -> TrainResult:
  """Fits a `RewardModel` with the Bradley–Terry loss (eq. 1); evaluates on `test` every
  `eval_every` steps (0: at the end only). `optimizer`: an `OptimizerConfig` (AdamW via
  `make_optimizer`, default learning rate 1e-3) or any optax transformation."""
  if not isinstance(model, heads.RewardModel):
    raise TypeError(f"train_reward_model: expected a RewardModel, got {type(model).__name__}")
  return _train(
      model,
      reward_train_step,
      train,
      test,
      steps=steps,
      batch_size=batch_size,
      optimizer=optimizer,
      seed=seed,
      eval_every=eval_every,
  )


PREFERENCE_MODELS = (heads.PairwisePreferenceModel, heads.GeneralPreferenceModel)


def train_preference_model(
    model,
    train: PreferencePairs,
    test: PreferencePairs,
    *,
    steps: int = 500,
    batch_size: int = 64,
    optimizer: OptimizerConfig | optax.GradientTransformation | None = None,
    seed: int = 0,
    eval_every: int = 0,
) -> TrainResult:
  """Fits a pairwise or GPM preference model with eq. 2 (otherwise as `train_reward_model`)."""
  if not isinstance(model, PREFERENCE_MODELS):
    raise TypeError(
        f"train_preference_model: expected one of {[m.__name__ for m in PREFERENCE_MODELS]}, "
        f"got {type(model).__name__} (a RewardModel trains with train_reward_model)"
    )
  return _train(
      model,
      preference_train_step,
      train,
      test,
      steps=steps,
      batch_size=batch_size,
      optimizer=optimizer,
      seed=seed,
      eval_every=eval_every,
  )
