"""Train state, optimizers and the trainable/frozen split shared by every algorithm.

A run fine-tunes *trainable* parameters against *frozen* ones (the base model, a reference
policy, reward models). The two live in separate pytrees so that frozen weights never enter
the optimizer state and never get copied into a checkpoint:

  full fine-tuning:  trainable = base parameters,          frozen = {}          θ = trainable
  LoRA:              trainable = low-rank factors (A, B),  frozen = base θ₀     θ = θ₀ + (α/r)·A·B

`Finetune(mode, ...).params(trainable, frozen)` gives θ for either mode, inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

FINETUNE_MODES = ("full", "lora")


@struct.dataclass
class TrainState:
  """Everything a step updates: trainable params, optimizer state, step counter, PRNG key."""

  params: Any
  opt_state: Any
  step: jax.Array
  key: jax.Array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, key: jax.Array):
    """The state at step 0. Leaves not yet placed on a device (the step, the key, optimizer
    counts) go where the params are (`_place_like_params`), so that the state a jitted step
    returns has the placement of the state it was given and the step compiles once."""
    state = cls(
        params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32), key=key
    )
    return _place_like_params(state)

  def apply_gradients(self, grads, optimizer: optax.GradientTransformation) -> "TrainState":
    updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
    return self.replace(
        params=optax.apply_updates(self.params, updates), opt_state=opt_state, step=self.step + 1
    )


def _committed_sharding(tree):
  """The sharding of the first leaf committed to devices, or None."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.core.Tracer):  # traced (create inside jit / eval_shape)
      return None
    if isinstance(leaf, jax.Array) and leaf.committed:
      return leaf.sharding
  return None


def _place_like_params(state: TrainState) -> TrainState:
  """Commits the state's uncommitted leaves: on the params' device, or replicated over their
  mesh. Mixing committed and uncommitted leaves compiles a jitted step twice: its outputs are
  all committed, so the second call sees other input shardings than the first."""
  sharding = _committed_sharding(state.params)
  if sharding is None:
    return state
  if isinstance(sharding, jax.sharding.NamedSharding):
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  elif len(sharding.device_set) == 1:
    target = next(iter(sharding.device_set))
  else:
    return state
  place = lambda leaf: (
      jax.device_put(leaf, target) if isinstance(leaf, jax.Array) and not leaf.committed else leaf
  )
  return jax.tree_util.tree_map(place, state)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with optional global-norm clipping; mirrors `config.optimizer` of experiments."""

  learning_rate: float = 3e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4
  max_grad_norm: float = 1.0  # <= 0 disables clipping


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019) preceded by global-norm gradient clipping.

  `cfg` is an OptimizerConfig or any object/ConfigDict with the same fields.
  """
  get = lambda k: getattr(cfg, k)
  adam = optax.adamw(
      get("learning_rate"),
      b1=get("b1"),
      b2=get("b2"),
      eps=get("eps"),
      weight_decay=get("weight_decay"),
  )
  if get("max_grad_norm") > 0:
    return optax.chain(optax.clip_by_global_norm(get("max_grad_norm")), adam)
  return adam


def warmup_cosine_adamw(train_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) of the pretraining scripts: AdamW with a linear
  warmup to `learning_rate` over `warmup_steps` (at most `steps`), cosine decay to
  `learning_rate · end_lr_fraction` at `steps`, after global-norm clipping at `max_grad_norm`
  (<= 0: no clipping). `train_config` is the scripts' `config.train` section."""
  tc = train_config
  schedule = optax.warmup_cosine_decay_schedule(
      0.0,
      tc.learning_rate,
      min(tc.warmup_steps, tc.steps),
      tc.steps,
      tc.learning_rate * tc.end_lr_fraction,
  )
  clip = optax.clip_by_global_norm(tc.max_grad_norm) if tc.max_grad_norm > 0 else optax.identity()
  return optax.chain(clip, optax.adamw(schedule, weight_decay=tc.weight_decay)), schedule


@dataclasses.dataclass(frozen=True)
class Finetune:
  """Which parameters train: all of them ("full") or LoRA factors of rank `lora_rank`.

  LoRA (`alignjax.models.lora`): A is drawn by `lora_init` ("kaiming" as PEFT's default, or
  "gaussian"), B = 0, scale α/r (α/√r with `rslora`). Which kernels, and which of their axes
  are the input, is the `plan` given to `split`: the default adapts every kernel over all but
  its last axis (Linear and Conv layers); an LM passes `alignjax.models.lora.lm_lora_plan`.
  """

  mode: str = "full"
  lora_rank: int = 4
  lora_alpha: float | None = None  # None: alpha = rank, i.e. scale 1
  lora_init: str = "kaiming"
  rslora: bool = False

  def __post_init__(self):
    if self.mode not in FINETUNE_MODES:
      raise ValueError(f"finetune mode={self.mode!r}: valid choices are {FINETUNE_MODES}")
    if self.mode == "lora" and self.lora_rank <= 0:
      raise ValueError(f"lora_rank={self.lora_rank}: must be > 0")

  @classmethod
  def from_config(cls, cfg) -> "Finetune":
    return cls(
        mode=cfg.mode,
        lora_rank=int(cfg.get("lora_rank", 4)),
        lora_alpha=cfg.get("lora_alpha"),
        lora_init=cfg.get("lora_init", "kaiming"),
        rslora=bool(cfg.get("rslora", False)),
    )

  def split(self, base_params, key, plan: tuple[str, Any] | None = None):
    """(trainable, frozen), see the module docstring. `plan` = (target regex, num_in) of
    `alignjax.models.lora.init_lora` (None: every kernel, all but its last axis as input)."""
    if self.mode == "full":
      return base_params, {}
    from alignjax.models import lora  # local: models import nothing from here

    target, num_in = plan if plan is not None else (lora.DEFAULT_TARGET, None)
    trainable = lora.init_lora(
        base_params, self.lora_rank, key, target=target, num_in=num_in, init=self.lora_init
    )
    return trainable, base_params

  def params(self, trainable, frozen):
    """θ for the forward pass: `trainable` (full) or θ₀ + scale·A·B (LoRA); jittable."""
    if self.mode == "full":
      return trainable
    from alignjax.models import lora

    return lora.merge_lora(frozen, trainable, alpha=self.lora_alpha, rslora=self.rslora)


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def tree_max_abs_diff(a, b) -> float:
  """Largest |a - b| over all leaves of two pytrees of the same structure."""
  diffs = jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
  return float(max(jax.tree_util.tree_leaves(diffs), default=0.0))
