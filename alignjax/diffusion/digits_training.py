r"""Pieces of the embedded digits pretraining: losses, EMA, the UNet training loop, samplers
of the trained model and the recognition check (alignjax.diffusion.digits_pretraining runs
them in order; experiments/pretrain_diffusion.py is its command line).

UNet objective (Ho et al. 2020, "L_simple", eq. 14 there) with label dropout for
classifier-free guidance (Ho & Salimans 2022):

  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,    eps ~ N(0, I),  t ~ U{0, ..., N-1}
  c~  = null (= num_classes) with probability p_uncond, else the label c
  L(theta) = E || eps - eps_theta(x_t, t, c~) ||^2        (mean over batch and pixels)     (1)

The sampled and saved weights are an exponential moving average of the trained ones, with
the usual warm-up of the decay so that early averages are not dominated by the init:

  d_k = min(decay, (1 + k) / (10 + k)),     theta_ema <- d_k theta_ema + (1 - d_k) theta   (2)

Evaluation draws `per_class` samples for every digit c with DDIM and classifier-free guidance
(alignjax.diffusion.samplers) and reports the recognition rate

  R = (1 / n) sum_i 1[argmax_k classifier(images_i)_k = c_i],  images = clip((x+1)/2, 0, 1)  (3)

Flow-matching variant (`config.objective = "flow"`): the same UNet is trained as a
rectified-flow velocity model v_theta(x, t, c) (alignjax.diffusion.flow; t: noise 0 -> data 1).
The UNet's time input is the diffusion timestep scale, run backwards so that noise sits at the
large timesteps as for the eps model:

  tau(t) = time_scale * (1 - t),   v_theta(x, t, c) = UNet(x, tau(t), c)   (a float tau)     (4)
  L(theta) = E || v_theta(X_t, t, c~) - (X_1 - X_0) ||^2 / D,  X_t = (1 - t) X_0 + t X_1     (5)

(flow eqs. 1-2, divided by the D pixels so that it is a per-pixel mean as eq. 1 is; t ~ U[0, 1),
the same label dropout). Classifier-free guidance combines velocities like eq. 7 of the
samplers: v = v(x, t, null) + w (v(x, t, c) - v(x, t, null)) (eq. 6), and the recognition
check samples with the Euler ODE or the memoryless Euler-Maruyama SDE (flow eqs. 6-7).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax import finite, metrics, training
from alignjax.data import digits
from alignjax.diffusion import flow, samplers, schedules
from alignjax.models import classifier as classifier_lib
from alignjax.models import unet as unet_lib

log = logging.getLogger(__name__)

OBJECTIVES = ("eps", "flow")
FLOW_SAMPLERS = ("ode", "sde")


def objective_of(config) -> str:
  """config.objective, "eps" when absent (the eps config predates the key)."""
  return config.get("objective", "eps")


def unet_config(config) -> unet_lib.UNetConfig:
  """The UNetConfig of a pretraining config (config.unet + the digits' fixed sizes)."""
  return unet_lib.UNetConfig.from_dict(
      {
          **config.unet.to_dict(),
          "image_size": 8,
          "in_channels": 1,
          "out_channels": 1,
          "num_classes": digits.NUM_CLASSES,
      }
  )


def classifier_config(config) -> classifier_lib.ClassifierConfig:
  """The ClassifierConfig of a pretraining config (config.classifier + the 10 classes)."""
  return classifier_lib.ClassifierConfig.from_dict(
      {**config.classifier.to_dict(), "num_classes": digits.NUM_CLASSES}
  )


def init_model(build, key):
  """`build(nnx.Rngs(key))` initialised in one jitted computation (not op by op).

  With an "rbg" key this compiles several times faster on CPU than the default threefry
  initialisers run eagerly (config.prng_impl).
  """
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(key))))
  state = jax.jit(lambda k: nnx.state(build(nnx.Rngs(k))))(key)
  return nnx.merge(graphdef, state)


# ============================================================================ losses


def diffusion_loss(eps_fn, schedule, x0, cond, key, *, p_uncond: float, null_class: int):
  """Epsilon-prediction MSE with label dropout (eq. 1); eps_fn(x_t, t, cond) -> eps."""
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps, jnp.int32)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  drop = jax.random.bernoulli(k_drop, p_uncond, (b,))
  cond = jnp.where(drop, null_class, cond).astype(jnp.int32)
  x_t = schedules.add_noise(schedule, x0, eps, t)
  return jnp.mean((eps - eps_fn(x_t, t, cond)) ** 2)  # eq. 1


def flow_loss(vel_fn, x1, cond, key, *, p_uncond: float, null_class: int):
  """Eq. 5: per-pixel rectified-flow loss with label dropout; vel_fn(x_t, t, cond) -> v."""
  k_flow, k_drop = jax.random.split(key)
  x0, t = flow.sample_noise_and_time(x1, k_flow)
  drop = jax.random.bernoulli(k_drop, p_uncond, (x1.shape[0],))
  cond = jnp.where(drop, null_class, cond).astype(jnp.int32)
  per_example_sum = flow.flow_matching_loss(lambda x, tt: vel_fn(x, tt, cond), x0, x1, t)
  return per_example_sum / (x1.size // x1.shape[0])  # eq. 5


def ema_update(ema, params, step, decay: float):
  """theta_ema <- d_k theta_ema + (1 - d_k) theta, d_k = min(decay, (1+k)/(10+k)) (eq. 2)."""
  step = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


# ============================================================================ UNet training


def train_unet(config, x_train, y_train, schedule, key, writer=None):
  """Trains the UNet (eqs. 1-2, or 5 and 2 for the flow objective; schedule is then unused)
  with PRNG `key`; returns (graphdef, ema_params, final_loss)."""
  cfg, tc = unet_config(config), config.train
  init_key, key = jax.random.split(key)
  model = init_model(lambda rngs: unet_lib.UNet(cfg, rngs=rngs), init_key)
  graphdef, params = nnx.split(model)
  log.info("UNet: %d parameters", unet_lib.param_count(model))
  tx, lr = training.warmup_cosine_adamw(tc)
  opt_state = tx.init(params)
  ema = jax.tree.map(jnp.copy, params)  # distinct buffers: all three are donated
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)

  def step_fn(params, opt_state, ema, step, key):
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (tc.batch_size,), 0, x_train.shape[0])

    def loss_fn(p):
      model_fn = lambda x, t, c: nnx.merge(graphdef, p)(x, t, c)
      if objective_of(config) == "flow":
        return flow_loss(
            flow.unet_velocity(model_fn, config.flow.time_scale),
            x_train[idx],
            y_train[idx],
            k_loss,
            p_uncond=tc.p_uncond,
            null_class=cfg.null_class,
        )
      return diffusion_loss(
          model_fn,
          schedule,
          x_train[idx],
          y_train[idx],
          k_loss,
          p_uncond=tc.p_uncond,
          null_class=cfg.null_class,
      )

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    mask = finite.nonfinite_mask(  # alignjax.finite eqs. 1-3
        {"loss": loss, "grad_norm": optax.tree.norm(grads)}, new_params, new_opt_state
    )
    new = (new_params, new_opt_state, ema_update(ema, new_params, step, tc.ema_decay))
    if config.finite.policy == "skip":
      new = finite.select(mask, new, (params, opt_state, ema))
    return *new, loss, mask

  step_fn = jax.jit(step_fn, donate_argnums=(0, 1, 2))
  monitor = finite.Monitor.from_config(config.finite, unit="UNet step")
  losses, masks = [], []
  for step in metrics.progress(range(tc.steps), desc="unet"):
    params, opt_state, ema, loss, mask = step_fn(
        params, opt_state, ema, step, jax.random.fold_in(key, step)
    )
    losses.append(loss)
    masks.append(mask)
    if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
      monitor.check_steps(step + 2 - len(masks), masks)  # steps are counted from 1
      mean_loss = float(jnp.mean(jnp.stack(losses)))
      losses, masks = [], []
      if writer is not None:
        writer.write_scalars(
            step + 1, {"unet/loss": mean_loss, "unet/learning_rate": float(lr(step))}
        )
  return graphdef, ema, mean_loss


# ============================================================================ sampling


def _in_batches(draw, params, cond, key, batch_size: int) -> np.ndarray:
  """draw(params, cond_batch, fold_in(key, i)) over batches of `cond`, the last one padded
  with class 0 (one compiled shape) and cut back; the samples as one numpy array."""
  cond = np.asarray(cond, np.int32)
  out = []
  for i, start in enumerate(range(0, len(cond), batch_size)):
    chunk = cond[start : start + batch_size]
    pad = batch_size - len(chunk)  # keep one compiled shape
    padded = np.concatenate([chunk, np.zeros(pad, np.int32)]) if pad else chunk
    x = draw(params, jnp.asarray(padded), jax.random.fold_in(key, i))
    out.append(np.asarray(x)[: len(chunk)])
  return np.concatenate(out)


def sample_digits(
    graphdef,
    params,
    schedule,
    cond,
    key,
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    clip_sample,
    batch_size: int,
) -> np.ndarray:
  """Class-conditional DDIM samples x_0 in [-1, 1] for every id in `cond` (numpy [N,8,8,1])."""

  @jax.jit
  def draw(params, cond, key):
    eps_fn = lambda x, t, c: nnx.merge(graphdef, params)(x, t, c)
    guided = samplers.classifier_free_guidance(eps_fn, guidance_scale)
    return samplers.sample(
        guided,
        schedule,
        cond,
        key,
        shape=(8, 8, 1),
        num_steps=num_steps,
        eta=eta,
        clip_sample=clip_sample,
    ).final

  return _in_batches(draw, params, cond, key, batch_size)


def sample_digits_flow(
    graphdef,
    params,
    cond,
    key,
    *,
    num_steps: int,
    sampler: str,
    guidance_scale: float,
    time_scale: float,
    null_class: int,
    batch_size: int,
) -> np.ndarray:
  """Class-conditional samples X_1 of the flow model (eqs. 4, 6; flow eq. 7) as numpy [N,8,8,1].

  sampler "ode": Euler steps of dX = v dt; "sde": the memoryless Euler-Maruyama SDE
  (flow eq. 6 with shift 1/num_steps). Noise X_0 ~ N(0, I) is drawn from `key` per batch.
  """
  if sampler not in FLOW_SAMPLERS:
    raise ValueError(f"sampler={sampler!r}: valid choices are {FLOW_SAMPLERS}")

  @jax.jit
  def draw(params, cond, key):
    model_fn = lambda x, t, c: nnx.merge(graphdef, params)(x, t, c)
    vel = flow.guided_velocity(flow.unet_velocity(model_fn, time_scale), guidance_scale, null_class)
    vel_fn = lambda x, t: vel(x, t, cond)
    k_x0, k_sde = jax.random.split(key)
    x0 = jax.random.normal(k_x0, (cond.shape[0], 8, 8, 1), jnp.float32)
    if sampler == "ode":
      return flow.sample_ode(vel_fn, x0, num_steps=num_steps).final
    return flow.sample_sde(
        vel_fn, x0, k_sde, num_steps=num_steps, sigma_fn=flow.memoryless_sigma(1.0 / num_steps)
    ).final

  return _in_batches(draw, params, cond, key, batch_size)


def recognition(clf, images, cond) -> tuple[float, list[float]]:
  """Recognition rate R of eq. 3 and its value per class."""
  predicted = classifier_lib.predict(clf, images)
  per_class = [float(np.mean(predicted[cond == c] == c)) for c in range(digits.NUM_CLASSES)]
  return float(np.mean(predicted == cond)), per_class
