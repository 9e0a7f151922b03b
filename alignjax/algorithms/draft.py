"""DRaFT: fine-tuning a diffusion model by backpropagating a differentiable reward through its
sampler (Clark, Vicol, Swersky & Fleet 2023, "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards").

Sampling is a chain of T DDIM steps (samplers eqs. 1-4), deterministic with eta = 0 (the
paper's choice) and reparameterised (x_s = mu + sigma z with z drawn from a fixed key) when
eta > 0, so the final sample is a differentiable function of the parameters θ:

  (1)  x_{i+1} = Φ_i(x_i; θ) = ddim_step(ε̃_θ(x_i, t_i, c), x_i, t_i → s_i),   x_0 := x_T ~ N(0, I),

where ε̃_θ is the classifier-free-guided prediction (samplers eq. 7; the unguided one when the
guidance scale is 1). The chain index i = 0..T-1 runs over the descending inference timesteps
t_i (schedules eq. 6); x_T below means the chain's last state (the clean sample).

DRaFT maximises the reward of the sample, optionally with a regulariser toward the base model:

  (2)  L(θ) = − λ_r · (1/B) Σ_b r(clip((x_T,b + 1) / 2, 0, 1), c_b)  +  λ_KL · R(θ),

with λ_r = `reward_scale` and λ_KL = `kl_weight`.

DRaFT-K (`truncation_k` = K; None = full DRaFT, K = T) stops the gradient entering the last K
steps: the first T − K steps run with stop_gradient(θ) and their output is
stop_gradient(x_{T−K}), so

  (3)  ∇_θ L = ∂L/∂θ through Φ_{T−K}, ..., Φ_{T−1} only;

the parameters get gradient only through the last K steps (exactly zero from earlier steps).

DRaFT-LV (`lv_samples` = n > 0, K = 1; the paper's low-variance estimator). Per update:

  (4)  x_T = Φ_{T−1} ∘ ... ∘ Φ_0(x_0; stop_gradient(θ))                    (no gradient)
       for j = 1..n:  ε_j ~ N(0, I),
                      x'_j = sqrt(abar_t) x_T + sqrt(1 − abar_t) ε_j     (t = t_{T−1}, the last
                                                                         step's timestep)
                      x̂_j = Φ_{T−1}(x'_j; θ)                            (one differentiable step)
       ∇_θ L = −(λ_r / n) Σ_j ∇_θ (1/B) Σ_b r(x̂_{j,b}, c_b)  (+ λ_KL ∇_θ R),

i.e. the final sample is re-noised n times to the last step's noise level and the reward
gradients of the n one-step denoisings are averaged (the n re-noised copies form one batch of
n·B). The reported reward is that of the n·B re-denoised samples.

The regulariser (λ_KL > 0) penalises the distance of the fine-tuned noise prediction from the
frozen base model's along the differentiable part W of the trajectory (the last K states, or
the n·B re-noised states of DRaFT-LV):

  (5)  R(θ) = (1/|W|) Σ_{i∈W} (1/(B D)) Σ_{b,d} (ε̃_θ(x_i, t_i, c) − ε̃_base(x_i, t_i, c))²_{b,d},

with D the number of elements of one sample and the states x_i those of the DRaFT chain
(their dependence on θ inside W is differentiated too; base parameters are constants). For
Gaussian steps of equal variance this is, up to a per-step constant factor, the KL divergence
between the fine-tuned and base transition kernels at the visited states.

Conditioning c is a pytree whose leaves are all [B, ...] (class ids [B]; for text models e.g.
{"text": embeddings [B, S, D], "prompt_ids": token ids [B, S]}), as in alignjax.diffusion.
samplers (`samplers.batch_size`); `null_cond` is one example's null condition of the same
structure (samplers eq. 7), and DRaFT-LV tiles every leaf n times. The reward sees the same
pytree and picks the leaves it needs.

Decoding and the reward. The reward of eq. 2 is taken of decode(x_T), differentiably:

  (6)  r_b = reward(decode(x_T)_b, c_b),   decode = clip((x + 1) / 2, 0, 1) by default,

with `decode_builder(frozen) -> decode` (e.g. a VAE decoder for a latent model) and
`reward_builder(frozen) -> reward` built from `frozen`, a jit argument, so decoder and reward
weights are data of the compiled step rather than constants baked into it; a plain
`reward_fn(images, c)` closure is the alternative to `reward_builder` (exactly one of the two).

Parameter transforms (`prepare`). With LoRA the model's weights are a function of the
trainable factors, W = W_0 + A B. Building the model inside every step of the chain would
recompute that merge in every scanned step (and again in the rematerialised backward pass).
`prepare(trainable, frozen) -> prepared` computes it ONCE per loss evaluation, outside the
scans and differentiably (the gradient flows back through it to `trainable`), and every step
then builds its EpsFn as `eps_fn_builder(prepared, frozen)`; the no-gradient first T − K
steps use stop_gradient(prepared). Without `prepare`, `eps_fn_builder(trainable, frozen)` is
called in each step. `sample_differentiable` and `lv_denoise` take whatever the builder takes
(pass them prepared parameters).

Memory: the steps in W run inside one `lax.scan` whose body is wrapped in `jax.checkpoint`
with a policy from `REMAT_POLICIES` ("none": no rematerialisation, activations of every step
are stored; "full": only each step's input x_i is stored and the step is recomputed in the
backward pass; "dots_saveable" etc.: jax.checkpoint_policies of the same name).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from alignjax.diffusion import samplers
from alignjax.diffusion.schedules import (
    NoiseSchedule,
    add_noise,
    inference_prev_timesteps,
    inference_timesteps,
)
from alignjax.rewards.base import Reward
from alignjax.training import TrainState

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no jax.checkpoint at all
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

EpsFnBuilder = Callable[[Any, Any], samplers.EpsFn]


# --------------------------------------------------------------------------- options


def remat(fn: Callable, policy: str) -> Callable:
  """`fn` wrapped in jax.checkpoint with the named policy (identity for "none")."""
  if not isinstance(policy, str) or policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r}: valid policies are {sorted(REMAT_POLICIES)}")
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def _int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
  return int(value)


def _check_options(
    *,
    reward_fn,
    reward_builder=None,
    decode_builder=None,
    prepare=None,
    num_steps,
    truncation_k,
    lv_samples,
    eta,
    shape,
    remat_policy,
    reward_scale,
    kl_weight,
    base_eps_fn_builder,
) -> int:
  """Validates the DRaFT options; returns K, the number of differentiable chain steps."""
  num_steps = _int("num_steps", num_steps, 1)
  lv_samples = _int("lv_samples", lv_samples, 0)
  if truncation_k is None:
    k = num_steps
  else:
    k = _int("truncation_k", truncation_k, 1)
    if k > num_steps:
      raise ValueError(
          f"truncation_k={k}: must be None (full DRaFT) or between 1 and " f"num_steps={num_steps}"
      )
  if lv_samples > 0:
    if truncation_k not in (None, 1):
      raise ValueError(
          f"lv_samples={lv_samples} (DRaFT-LV) implies truncation_k=1; got "
          f"truncation_k={truncation_k} (use None or 1)"
      )
    k = 0  # the whole chain runs without gradient, eq. 4
  if (reward_fn is None) == (reward_builder is None):
    raise ValueError(
        "give exactly one of reward_fn (images, cond) -> [B] and reward_builder(frozen) -> "
        f"reward; got reward_fn={type(reward_fn).__name__}, "
        f"reward_builder={type(reward_builder).__name__}"
    )
  if isinstance(reward_fn, Reward) and not reward_fn.differentiable:
    raise ValueError(
        f"reward {reward_fn.name!r} is a host reward; DRaFT needs a "
        "differentiable reward (Reward.differentiable=True)"
    )
  for name, fn, kind in (
      ("reward_fn", reward_fn, "(images, cond) -> [B]"),
      ("reward_builder", reward_builder, "(frozen) -> reward (images, cond) -> [B]"),
      ("decode_builder", decode_builder, "(frozen) -> decode (x) -> images"),
      ("prepare", prepare, "(trainable, frozen) -> prepared parameters"),
  ):
    if fn is not None and not callable(fn):
      raise TypeError(f"{name} must be None or callable {kind}; got {type(fn).__name__}")
  if not 0.0 <= float(eta) <= 1.0:
    raise ValueError(f"eta={eta}: must lie in [0, 1] (0: deterministic DDIM, as in DRaFT)")
  if not (
      isinstance(shape, (tuple, list))
      and shape
      and all(isinstance(d, numbers.Integral) and d > 0 for d in shape)
  ):
    raise ValueError(f"shape={shape!r}: must be the shape of one sample, e.g. (8, 8, 1)")
  remat(lambda x: x, remat_policy)  # raises on an unknown policy name
  if not math.isfinite(float(reward_scale)) or float(reward_scale) == 0.0:
    raise ValueError(f"reward_scale={reward_scale}: must be finite and nonzero")
  if not float(kl_weight) >= 0.0 or not math.isfinite(float(kl_weight)):
    raise ValueError(f"kl_weight={kl_weight}: must be finite and >= 0")
  if float(kl_weight) > 0.0 and base_eps_fn_builder is None:
    raise ValueError(
        f"kl_weight={kl_weight} > 0 needs base_eps_fn_builder(frozen) -> EpsFn "
        "of the frozen base model (eq. 5)"
    )
  return k


# --------------------------------------------------------------------------- the chain


def _step_fn(
    eps_fn_builder,
    base_eps_fn_builder,
    trainable,
    frozen,
    schedule,
    cond,
    *,
    eta,
    guidance_scale,
    null_cond,
    clip_sample,
    penalty: bool,
):
  """Φ_i of eq. 1 as a scan body: (x, (t, prev_t, key)) -> (x_prev, penalty term of eq. 5)."""
  batch = samplers.batch_size(cond)

  def step(x, inputs):
    t, prev_t, key = inputs
    t_b = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (batch,))
    prev_b = jnp.broadcast_to(jnp.asarray(prev_t, jnp.int32), (batch,))
    eps_fn = samplers.classifier_free_guidance(
        eps_fn_builder(trainable, frozen), guidance_scale, null_cond
    )
    eps = eps_fn(x, t_b, cond)
    out = samplers.ddim_step(
        schedule, eps, x, t_b, prev_b, eta, key=key, clip_sample=clip_sample
    )  # eq. 1
    term = jnp.zeros((), jnp.float32)
    if penalty:
      base_fn = samplers.classifier_free_guidance(
          base_eps_fn_builder(frozen), guidance_scale, null_cond
      )
      term = jnp.mean(jnp.square(eps - base_fn(x, t_b, cond)))  # eq. 5, one step
    return out.prev_sample, term

  return step


def sample_differentiable(
    eps_fn_builder: EpsFnBuilder,
    trainable,
    frozen,
    schedule: NoiseSchedule,
    cond: Any,
    key: jax.Array,
    *,
    num_steps: int,
    truncation_k: int | None = None,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    null_cond: Any = 10,
    shape: tuple[int, ...],
    remat_policy: str = "full",
    base_eps_fn_builder: Callable | None = None,
    kl: bool = False,
    clip_sample=None,
    initial_latents: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The DDIM chain of eq. 1 with gradients through its last K steps (eq. 3).

  Returns (x_T [B, *shape], R) with R the penalty of eq. 5 over the last K steps (0 unless
  kl). truncation_k=None differentiates every step. cond: a pytree of [B, ...] leaves;
  `trainable` is what eps_fn_builder takes (the prepared parameters when using `prepare`).
  x_0 ~ N(0, I) is drawn from `key` (float32) unless `initial_latents` is given; per-step
  noise (eta > 0) from keys split from it.
  """
  k = num_steps if truncation_k is None else truncation_k
  cond = jax.tree_util.tree_map(jnp.asarray, cond)
  full_shape = (samplers.batch_size(cond),) + tuple(int(d) for d in shape)
  n, offset = schedule.num_train_timesteps, schedule.steps_offset
  ts = jnp.asarray(inference_timesteps(n, num_steps, offset))
  prev_ts = jnp.asarray(inference_prev_timesteps(n, num_steps, offset))
  noise_key, steps_key = jax.random.split(key)
  keys = jax.random.split(steps_key, num_steps)
  if initial_latents is None:
    x = jax.random.normal(noise_key, full_shape, jnp.float32)
  elif initial_latents.shape != full_shape:
    raise ValueError(f"initial_latents shape {initial_latents.shape} must be {full_shape}")
  else:
    x = initial_latents
  common = dict(
      eta=eta, guidance_scale=guidance_scale, null_cond=null_cond, clip_sample=clip_sample
  )
  split = num_steps - k
  if split > 0:  # eq. 3: the first T - K steps carry no gradient
    no_grad_step = _step_fn(
        eps_fn_builder,
        None,
        jax.lax.stop_gradient(trainable),
        frozen,
        schedule,
        cond,
        penalty=False,
        **common,
    )
    x, _ = jax.lax.scan(no_grad_step, x, (ts[:split], prev_ts[:split], keys[:split]))
    x = jax.lax.stop_gradient(x)
  penalty = jnp.zeros((), jnp.float32)
  if k > 0:
    step = _step_fn(
        eps_fn_builder, base_eps_fn_builder, trainable, frozen, schedule, cond, penalty=kl, **common
    )
    x, terms = jax.lax.scan(
        remat(step, remat_policy), x, (ts[split:], prev_ts[split:], keys[split:])
    )
    penalty = jnp.mean(terms)  # eq. 5
  return x, penalty


def lv_denoise(
    eps_fn_builder: EpsFnBuilder,
    trainable,
    frozen,
    schedule: NoiseSchedule,
    final: jax.Array,
    cond: Any,
    key: jax.Array,
    *,
    num_steps: int,
    lv_samples: int,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    null_cond: Any = 10,
    base_eps_fn_builder: Callable | None = None,
    kl: bool = False,
    clip_sample=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The re-noise / one-step-denoise part of DRaFT-LV (eq. 4).

  `final` [B, ...] is the chain's sample (gradients to it are stopped). Returns
  (x̂ [n*B, ...] (copy j of sample b at row j*B + b), cond with every leaf tiled to
  [n*B, ...] in the same order, R of eq. 5).
  """
  n, offset = schedule.num_train_timesteps, schedule.steps_offset
  t = int(inference_timesteps(n, num_steps, offset)[-1])
  prev_t = int(inference_prev_timesteps(n, num_steps, offset)[-1])
  noise_key, step_key = jax.random.split(key)
  final = jax.lax.stop_gradient(final)
  copies = jnp.broadcast_to(final[None], (lv_samples,) + final.shape)
  noise = jax.random.normal(noise_key, copies.shape, final.dtype)
  x_noisy = add_noise(schedule, copies, noise, t)  # eq. 4, re-noise to the last step's t
  x_noisy = x_noisy.reshape((-1,) + final.shape[1:])
  tile = lambda c: jnp.tile(c, (lv_samples,) + (1,) * (c.ndim - 1))
  cond_n = jax.tree_util.tree_map(lambda c: tile(jnp.asarray(c)), cond)
  step = _step_fn(
      eps_fn_builder,
      base_eps_fn_builder,
      trainable,
      frozen,
      schedule,
      cond_n,
      eta=eta,
      guidance_scale=guidance_scale,
      null_cond=null_cond,
      clip_sample=clip_sample,
      penalty=kl,
  )
  x_hat, penalty = step(x_noisy, (t, prev_t, step_key))
  return x_hat, cond_n, penalty


# --------------------------------------------------------------------------- loss and update


def images_from(x: jax.Array) -> jax.Array:
  """Reward images in [0, 1] from diffusion samples in [-1, 1]."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def draft_loss(
    trainable,
    frozen,
    cond: Any,
    key: jax.Array,
    *,
    eps_fn_builder: EpsFnBuilder,
    schedule: NoiseSchedule,
    reward_fn: Callable | None = None,
    num_steps: int,
    truncation_k: int | None = None,
    lv_samples: int = 0,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    null_cond: Any = 10,
    shape: tuple[int, ...],
    remat_policy: str = "full",
    reward_scale: float = 1.0,
    kl_weight: float = 0.0,
    base_eps_fn_builder: Callable | None = None,
    clip_sample=None,
    initial_latents: jax.Array | None = None,
    decode_builder: Callable | None = None,
    reward_builder: Callable | None = None,
    prepare: Callable | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L(θ) of eq. 2 for DRaFT, DRaFT-K (eq. 3) or DRaFT-LV (eq. 4); returns (loss, metrics).

  metrics holds scalars and "samples" [B, *shape]: the chain's final samples x_T (for
  DRaFT-LV the chain's output before re-noising), gradient stopped, for logging (e.g. a
  diversity measure) without sampling the batch a second time.

  Differentiate with respect to `trainable` (see `reward_gradient`). `eps_fn_builder(
  trainable, frozen)` gives the unguided EpsFn of the fine-tuned model, `base_eps_fn_builder(
  frozen)` that of the frozen base model (needed when kl_weight > 0). `reward_fn(images,
  cond) -> [B]` is a differentiable Reward or a jittable function of the decoded images
  (eq. 6); or, instead of it, `reward_builder(frozen)` returns that function. cond is a
  pytree of [B, ...] leaves, `null_cond` one example's null condition of its structure.
  `decode_builder(frozen)` returns decode(x) -> images (default `images_from`). With
  `prepare`, `prepare(trainable, frozen)` runs once here and the chain's steps call
  `eps_fn_builder(prepared, frozen)` (module docstring).
  """
  _check_options(
      reward_fn=reward_fn,
      reward_builder=reward_builder,
      decode_builder=decode_builder,
      prepare=prepare,
      num_steps=num_steps,
      truncation_k=truncation_k,
      lv_samples=lv_samples,
      eta=eta,
      shape=shape,
      remat_policy=remat_policy,
      reward_scale=reward_scale,
      kl_weight=kl_weight,
      base_eps_fn_builder=base_eps_fn_builder,
  )
  kl = float(kl_weight) > 0.0
  cond = jax.tree_util.tree_map(jnp.asarray, cond)
  # once per loss, differentiably, outside the scans (module docstring, "prepare")
  params = trainable if prepare is None else prepare(trainable, frozen)
  decode = images_from if decode_builder is None else decode_builder(frozen)
  reward = reward_fn if reward_builder is None else reward_builder(frozen)
  chain_key, lv_key = jax.random.split(key)
  common = dict(
      eta=eta,
      guidance_scale=guidance_scale,
      null_cond=null_cond,
      base_eps_fn_builder=base_eps_fn_builder,
      kl=kl,
      clip_sample=clip_sample,
  )
  if lv_samples > 0:
    final, _ = sample_differentiable(  # eq. 4, first line: the chain without gradient
        eps_fn_builder,
        jax.lax.stop_gradient(params),
        frozen,
        schedule,
        cond,
        chain_key,
        num_steps=num_steps,
        shape=shape,
        remat_policy="none",
        initial_latents=initial_latents,
        **{**common, "kl": False},
    )
    x, reward_cond, penalty = lv_denoise(
        eps_fn_builder,
        params,
        frozen,
        schedule,
        final,
        cond,
        lv_key,
        num_steps=num_steps,
        lv_samples=lv_samples,
        **common,
    )
  else:
    x, penalty = sample_differentiable(
        eps_fn_builder,
        params,
        frozen,
        schedule,
        cond,
        chain_key,
        num_steps=num_steps,
        truncation_k=truncation_k,
        shape=shape,
        remat_policy=remat_policy,
        initial_latents=initial_latents,
        **common,
    )
    reward_cond = cond
    final = x
  rewards = jnp.asarray(reward(decode(x), reward_cond))  # eq. 6
  if rewards.shape != (x.shape[0],) or not jnp.issubdtype(rewards.dtype, jnp.floating):
    raise ValueError(
        f"the reward must return floats [B] = ({x.shape[0]},); got "
        f"{rewards.dtype} {rewards.shape}"
    )
  reward_mean = jnp.mean(rewards)
  loss = -reward_scale * reward_mean + kl_weight * penalty  # eq. 2
  return loss, {
      "loss": loss,
      "reward_mean": reward_mean,
      "reward_std": jnp.std(rewards),
      "kl_penalty": penalty,
      "samples": jax.lax.stop_gradient(final),
  }


def reward_gradient(
    trainable, frozen, cond: Any, key: jax.Array, **options
) -> tuple[Any, dict[str, jax.Array]]:
  """(∇_trainable L, metrics) of `draft_loss` with the same keyword options."""
  return jax.grad(functools.partial(draft_loss, **options), has_aux=True)(
      trainable, frozen, cond, key
  )


def make_update_fn(
    eps_fn_builder: EpsFnBuilder,
    schedule: NoiseSchedule,
    reward_fn: Callable | None,
    optimizer: optax.GradientTransformation,
    *,
    num_steps: int,
    truncation_k: int | None = None,
    lv_samples: int = 0,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    null_cond: Any = 10,
    shape: tuple[int, ...],
    remat_policy: str = "full",
    reward_scale: float = 1.0,
    kl_weight: float = 0.0,
    base_eps_fn_builder: Callable | None = None,
    clip_sample=None,
    decode_builder: Callable | None = None,
    reward_builder: Callable | None = None,
    prepare: Callable | None = None,
):
  """Builds `update(state, frozen, cond, key) -> (state, metrics)`: one DRaFT step.

  Samples B chains (cond: a pytree of [B, ...] leaves, `samplers.batch_size`) from `key`,
  takes the gradient of eq. 2 (DRaFT / DRaFT-K / DRaFT-LV per the options, see
  `draft_loss`) with respect to `state.params` (the trainable parameters: full weights or
  LoRA factors, `alignjax.training.Finetune.split`) and applies it. `frozen` (LoRA base
  weights, the base model for the eq. 5 penalty, decoder and reward weights) is never
  differentiated; it is the argument of the builders and of `prepare` (pass reward_fn=None
  with reward_builder: exactly one of the two). Pure and jittable; jit with the state
  donated. Options are checked here, before compilation. metrics: those of `draft_loss`
  (scalars and "samples") + "grad_norm".
  """
  options = dict(
      eps_fn_builder=eps_fn_builder,
      schedule=schedule,
      reward_fn=reward_fn,
      num_steps=num_steps,
      truncation_k=truncation_k,
      lv_samples=lv_samples,
      eta=eta,
      guidance_scale=guidance_scale,
      null_cond=null_cond,
      shape=tuple(shape),
      remat_policy=remat_policy,
      reward_scale=reward_scale,
      kl_weight=kl_weight,
      base_eps_fn_builder=base_eps_fn_builder,
      clip_sample=clip_sample,
      decode_builder=decode_builder,
      reward_builder=reward_builder,
      prepare=prepare,
  )
  _check_options(
      **{
          k: options[k]
          for k in (
              "reward_fn",
              "reward_builder",
              "decode_builder",
              "prepare",
              "num_steps",
              "truncation_k",
              "lv_samples",
              "eta",
              "shape",
              "remat_policy",
              "reward_scale",
              "kl_weight",
              "base_eps_fn_builder",
          )
      }
  )

  def update(state: TrainState, frozen, cond: Any, key: jax.Array):
    grads, metrics = reward_gradient(state.params, frozen, cond, key, **options)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads, optimizer), metrics

  return update


VARIANTS = ("full", "k", "1", "lv")


def variant_options(variant: str, truncation_k: int, lv_samples: int) -> dict:
  """`make_update_fn`'s (truncation_k, lv_samples) for a DRaFT variant: "full" (the gradient
  through every step), "k" (DRaFT-K: the last `truncation_k` steps), "1" (DRaFT-1) or "lv"
  (DRaFT-LV: `lv_samples` re-noised one-step denoisings)."""
  options = {
      "full": dict(truncation_k=None, lv_samples=0),
      "k": dict(truncation_k=truncation_k, lv_samples=0),
      "1": dict(truncation_k=1, lv_samples=0),
      "lv": dict(truncation_k=None, lv_samples=lv_samples),
  }
  if variant not in options:
    raise ValueError(f"DRaFT variant {variant!r}: valid choices are {VARIANTS}")
  return options[variant]
