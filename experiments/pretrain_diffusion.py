r"""Pretrain the embedded digits diffusion model and the digits classifier.

  python -m experiments.pretrain_diffusion --config=experiments/configs/pretrain_diffusion/digits.py --workdir=runs/pretrain_digits

A linear script: data → UNet training (jit, donated) → classifier training → class-conditional
DDIM samples → recognition rate → save both models + report.json. `ensure_pretrained` is the
entry the DDPO script (experiments/common.py) calls: it runs this pretraining only when the
cache lacks valid models for the requested config. It lives here, beside the training loop it
runs, rather than in `alignjax/`: the library stays free of training loops and of any
dependency on experiment configs, and the only callers are other experiment scripts.

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

Flow-matching variant (`config.objective = "flow"`, experiments/configs/pretrain_diffusion/
digits_flow.py): the same UNet is trained as a rectified-flow velocity model v_theta(x, t, c)
(alignjax.diffusion.flow; t: noise 0 -> data 1). The UNet's time input is the diffusion
timestep scale, run backwards so that noise sits at the large timesteps as for the eps model:

  tau(t) = time_scale * (1 - t),   v_theta(x, t, c) = UNet(x, tau(t), c)   (a float tau)     (4)
  L(theta) = E || v_theta(X_t, t, c~) - (X_1 - X_0) ||^2 / D,  X_t = (1 - t) X_0 + t X_1     (5)

(flow eqs. 1-2, divided by the D pixels so that it is a per-pixel mean as eq. 1 is; t ~ U[0, 1),
the same label dropout). Classifier-free guidance combines velocities like eq. 7 of the
samplers: v = v(x, t, null) + w (v(x, t, c) - v(x, t, null)) (eq. 6), and the recognition
check samples with the Euler ODE or the memoryless Euler-Maruyama SDE (flow eqs. 6-7).

Cache layout (the workdir): unet/ and classifier/ (io.save_model: config.json +
model.safetensors), report.json (accuracies, times, config, schedule; written last, so its
presence marks a complete run), metrics.jsonl, images/. The flow model's default cache is the
subdirectory flow/ of the eps cache (`default_cache_dir("flow")`), so the two never mix.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax import configs, finite, metrics, run_identity, scripts, training
from alignjax import workdir as workdir_lib
from alignjax.data import digits
from alignjax.diffusion import flow, samplers, schedules
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib

scripts.make_importable(__file__, __package__)

PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
OBJECTIVES = ("eps", "flow")
FLOW_SAMPLERS = ("ode", "sde")
FLOW_SUBDIR = "flow"
REPORT_NAME = "report.json"
UNET_DIR = "unet"
CLASSIFIER_DIR = "classifier"


def default_cache_dir(objective: str = "eps") -> str:
  """$ALIGNJAX_CACHE, else ~/.cache/alignjax/digits; the flow model lives in its flow/."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}: valid choices are {OBJECTIVES}")
  eps_dir = os.environ.get("ALIGNJAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "alignjax", "digits"
  )
  return eps_dir if objective == "eps" else os.path.join(eps_dir, FLOW_SUBDIR)


def objective_of(config) -> str:
  """config.objective, "eps" when absent (the eps config predates the key)."""
  return config.get("objective", "eps")


def default_config():
  from experiments.configs.pretrain_diffusion import digits as digits_config

  return digits_config.get_config()


# ============================================================================ validation


def validate(config) -> None:
  """Checks that can fail before any compilation; messages name the key."""
  configs.check_positive(
      config,
      "train.steps",
      "train.batch_size",
      "train.learning_rate",
      "train.log_every",
      "classifier_train.steps",
      "classifier_train.batch_size",
      "sample.per_class",
      "sample.num_steps",
      "sample.batch_size",
  )
  configs.check_nonnegative(
      config, "train.warmup_steps", "train.weight_decay", "train.max_grad_norm"
  )
  configs.check_fraction(config, "train.p_uncond")
  configs.check_fraction(config, "train.ema_decay")
  if objective_of(config) == "eps":
    configs.check_fraction(config, "sample.eta")
    configs.check_choice(config, "schedule.kind", schedules.KINDS)
  else:
    configs.check_choice(config, "objective", OBJECTIVES)
    configs.check_positive(config, "flow.time_scale")
    configs.check_choice(config, "sample.sampler", FLOW_SAMPLERS)
  configs.check_choice(config, "prng_impl", PRNG_IMPLS)
  finite.validate_config(config)
  if not len(config.sample.guidance_scales):
    raise configs.ConfigError("config.sample.guidance_scales=(): give at least one scale")
  for i, scale in enumerate(config.sample.guidance_scales):
    if not scale >= 0:
      raise configs.ConfigError(f"config.sample.guidance_scales[{i}]={scale!r}: must be >= 0")


def unet_config(config) -> unet_lib.UNetConfig:
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


# ============================================================================ UNet training


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


def unet_velocity(model_fn, time_scale: float):
  """vel(x, t, cond) = model_fn(x, tau(t), cond) with tau = time_scale (1 - t) (eq. 4)."""
  return lambda x, t, cond: model_fn(x, time_scale * (1.0 - t), cond)  # eq. 4


def guided_velocity(vel_fn, guidance_scale: float, null_class: int):
  """v(x, t, null) + w (v(x, t, c) - v(x, t, null)) (eq. 6) as vel(x, t, cond); one call on
  2B examples (w = 1: the conditional velocity alone)."""
  if guidance_scale == 1.0:
    return vel_fn

  def guided(x, t, cond):
    b = x.shape[0]
    v = vel_fn(
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([cond, jnp.full_like(cond, null_class)]),
    )
    return v[b:] + guidance_scale * (v[:b] - v[b:])  # eq. 6

  return guided


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


def train_unet(config, x_train, y_train, schedule, key, writer=None):
  """Trains the UNet (eqs. 1-2, or 5 and 2 for the flow objective; schedule is then unused)
  with PRNG `key`; returns (graphdef, ema_params, final_loss)."""
  cfg, tc = unet_config(config), config.train
  init_key, key = jax.random.split(key)
  model = init_model(lambda rngs: unet_lib.UNet(cfg, rngs=rngs), init_key)
  graphdef, params = nnx.split(model)
  logging.info("UNet: %d parameters", unet_lib.param_count(model))
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
            unet_velocity(model_fn, config.flow.time_scale),
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

  cond = np.asarray(cond, np.int32)
  out = []
  for i, start in enumerate(range(0, len(cond), batch_size)):
    chunk = cond[start : start + batch_size]
    pad = batch_size - len(chunk)  # keep one compiled shape
    padded = np.concatenate([chunk, np.zeros(pad, np.int32)]) if pad else chunk
    x = draw(params, jnp.asarray(padded), jax.random.fold_in(key, i))
    out.append(np.asarray(x)[: len(chunk)])
  return np.concatenate(out)


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
    vel = guided_velocity(unet_velocity(model_fn, time_scale), guidance_scale, null_class)
    vel_fn = lambda x, t: vel(x, t, cond)
    k_x0, k_sde = jax.random.split(key)
    x0 = jax.random.normal(k_x0, (cond.shape[0], 8, 8, 1), jnp.float32)
    if sampler == "ode":
      return flow.sample_ode(vel_fn, x0, num_steps=num_steps).final
    return flow.sample_sde(
        vel_fn, x0, k_sde, num_steps=num_steps, sigma_fn=flow.memoryless_sigma(1.0 / num_steps)
    ).final

  cond = np.asarray(cond, np.int32)
  out = []
  for i, start in enumerate(range(0, len(cond), batch_size)):
    chunk = cond[start : start + batch_size]
    pad = batch_size - len(chunk)  # keep one compiled shape
    padded = np.concatenate([chunk, np.zeros(pad, np.int32)]) if pad else chunk
    x = draw(params, jnp.asarray(padded), jax.random.fold_in(key, i))
    out.append(np.asarray(x)[: len(chunk)])
  return np.concatenate(out)


# ============================================================================ pipeline


def recognition(clf, images, cond) -> tuple[float, list[float]]:
  """Recognition rate R of eq. 3 and its value per class."""
  predicted = classifier_lib.predict(clf, images)
  per_class = [float(np.mean(predicted[cond == c] == c)) for c in range(digits.NUM_CLASSES)]
  return float(np.mean(predicted == cond)), per_class


def pretrain(config, workdir: str) -> dict:
  """Runs the whole pretraining into `workdir` and returns the report (also report.json).

  Holds the workdir's lock meanwhile (alignjax.workdir): a second pretraining into the same
  directory stops at once. Non-finite losses or weights stop the run before anything is saved
  (alignjax.finite).
  """
  validate(config)
  with workdir_lib.exclusive(workdir, this_process_only=True) as workdir:
    return _pretrain(config, workdir)


def _pretrain(config, workdir: str) -> dict:
  report_path = os.path.join(workdir, REPORT_NAME)
  if os.path.exists(report_path):
    os.remove(report_path)  # a stale report would mark a half-rewritten cache as complete
  t_start = time.time()
  key = jax.random.key(config.seed, impl=config.prng_impl)
  unet_key, clf_key, sample_key = jax.random.split(key, 3)
  is_flow = objective_of(config) == "flow"
  schedule = None if is_flow else schedules.make_schedule(**config.schedule.to_dict())
  x_train, y_train = digits.load_digits_split("train")
  x_test, y_test = digits.load_digits_split("test")
  writer = metrics.MetricWriter(workdir)

  # ---------------------------------------------------------------- UNet
  t0 = time.time()
  graphdef, ema, final_loss = train_unet(config, x_train, y_train, schedule, unet_key, writer)
  finite.check_host_tree(jax.device_get(ema), "the pretrained UNet (EMA weights)")
  unet_time = time.time() - t0
  unet_model = nnx.merge(graphdef, ema)
  model_io.save_model(os.path.join(workdir, UNET_DIR), unet_model, unet_model.config)

  # ---------------------------------------------------------------- classifier
  t0 = time.time()
  ccfg, ct = classifier_config(config), config.classifier_train
  init_key, train_key = jax.random.split(clf_key)
  clf = init_model(lambda rngs: classifier_lib.DigitsClassifier(ccfg, rngs=rngs), init_key)
  clf, clf_losses = classifier_lib.train_classifier(
      clf,
      digits.to_images(x_train),
      y_train,
      steps=ct.steps,
      batch_size=ct.batch_size,
      learning_rate=ct.learning_rate,
      weight_decay=ct.weight_decay,
      max_shift=ct.max_shift,
      noise_std=ct.noise_std,
      key=train_key,
  )
  test_acc = classifier_lib.accuracy(clf, digits.to_images(x_test), y_test)
  train_acc = classifier_lib.accuracy(clf, digits.to_images(x_train), y_train)
  classifier_time = time.time() - t0
  finite.check_host_tree(jax.device_get(nnx.state(clf)), "the trained digits classifier")
  model_io.save_model(os.path.join(workdir, CLASSIFIER_DIR), clf, ccfg)
  writer.write_scalars(
      config.train.steps,
      {
          "classifier/test_accuracy": test_acc,
          "classifier/train_accuracy": train_acc,
          "classifier/final_loss": clf_losses[-1],
      },
  )

  # ---------------------------------------------------------------- samples
  # One evaluation per guidance scale; the first is the headline number (config.targets).
  t0 = time.time()
  sc = config.sample
  cond = np.repeat(np.arange(digits.NUM_CLASSES, dtype=np.int32), sc.per_class)
  evaluations = []
  for i, scale in enumerate(sc.guidance_scales):
    if is_flow:
      x_gen = sample_digits_flow(
          graphdef,
          ema,
          cond,
          jax.random.fold_in(sample_key, i),
          num_steps=sc.num_steps,
          sampler=sc.sampler,
          guidance_scale=scale,
          time_scale=config.flow.time_scale,
          null_class=unet_model.config.null_class,
          batch_size=sc.batch_size,
      )
      sampler = {"sampler": sc.sampler}
    else:
      x_gen = sample_digits(
          graphdef,
          ema,
          schedule,
          cond,
          jax.random.fold_in(sample_key, i),
          num_steps=sc.num_steps,
          eta=sc.eta,
          guidance_scale=scale,
          clip_sample=sc.clip_sample,
          batch_size=sc.batch_size,
      )
      sampler = {"eta": sc.eta}
    images = digits.to_images(x_gen)
    rate, per_class = recognition(clf, images, cond)  # eq. 3
    evaluations.append(
        {
            "guidance_scale": float(scale),
            "num_steps": sc.num_steps,
            **sampler,
            "recognition_rate": rate,
            "per_class": per_class,
        }
    )
    writer.write_scalars(config.train.steps, {f"samples/recognition_rate_w{scale:g}": rate})
    grid = np.concatenate([images[cond == c][:10] for c in range(digits.NUM_CLASSES)])
    writer.write_images(
        config.train.steps, f"samples_w{scale:g}".replace(".", "_"), grid, ncols=10, scale=4
    )
  sample_time = time.time() - t0
  writer.close()

  headline = evaluations[0]["recognition_rate"]
  report = {
      "classifier_test_accuracy": test_acc,
      "classifier_train_accuracy": train_acc,
      "recognition_rate": headline,
      "evaluations": evaluations,
      "unet_final_loss": final_loss,
      "unet_params": unet_lib.param_count(unet_model),
      "num_samples": int(len(cond)),
      "targets_met": {
          "classifier_accuracy": test_acc >= config.targets.classifier_accuracy,
          "recognition_rate": headline >= config.targets.recognition_rate,
      },
      "time_s": {
          "unet_train": unet_time,
          "classifier_train": classifier_time,
          "sampling": sample_time,
          "total": time.time() - t_start,
      },
      "device": str(jax.devices()[0].platform),
      "schedule": None if is_flow else config.schedule.to_dict(),
      "config": json.loads(config.to_json()),
  }
  tmp = report_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, report_path)  # written last: marks the cache complete
  return report


# ============================================================================ cache


def _cache_status(cache_dir: str, config) -> str | None:
  """None if cache_dir holds a complete run of `config` whose models load; else the reason."""
  report_path = os.path.join(cache_dir, REPORT_NAME)
  if not os.path.isfile(report_path):
    return f"no {report_path}"
  try:
    with open(report_path) as f:
      report = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return f"unreadable {report_path}: {e}"
  # Fields that change how a run is operated, not the models it makes (e.g. the finite-check
  # policy), do not invalidate the cache (alignjax.run_identity).
  refused, _ = run_identity.compare(
      {"config": report.get("config")}, {"config": json.loads(config.to_json())}
  )
  if refused:
    return f"{report_path} was made with a different config ({'; '.join(refused[:3])})"
  try:
    model_io.load_model(os.path.join(cache_dir, UNET_DIR), unet_lib.UNet, unet_lib.UNetConfig)
    model_io.load_model(
        os.path.join(cache_dir, CLASSIFIER_DIR),
        classifier_lib.DigitsClassifier,
        classifier_lib.ClassifierConfig,
    )
  except (model_io.ModelIOError, OSError) as e:
    return f"models do not load: {e}"
  return None


def ensure_pretrained(cache_dir: str | None = None, config=None) -> dict:
  """Paths of the pretrained digits UNet and classifier, pretraining them if needed.

  Args:
    cache_dir: directory of the cache (default: `default_cache_dir` of the config's objective:
      $ALIGNJAX_CACHE or ~/.cache/alignjax/digits, and its flow/ for the flow model).
    config: pretraining ConfigDict (default: experiments/configs/pretrain_diffusion/digits.py).
      A cache made with another config is retrained.

  Returns:
    dict(unet_dir=..., classifier_dir=..., schedule=kwargs of schedules.make_schedule (None
    for the flow objective), report=path of report.json).
  In a multi-process job, process 0 pretrains (cache_dir must be on a shared file system)
  while the others wait at a barrier.
  """
  config = default_config() if config is None else config
  cache_dir = os.fspath(cache_dir or default_cache_dir(objective_of(config)))
  if jax.process_index() == 0:
    reason = _cache_status(cache_dir, config)
    if reason is not None:
      logging.info("Pretraining the digits models into %s (%s).", cache_dir, reason)
      pretrain(config, cache_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("alignjax_ensure_pretrained")
  return {
      "unet_dir": os.path.join(cache_dir, UNET_DIR),
      "classifier_dir": os.path.join(cache_dir, CLASSIFIER_DIR),
      "schedule": None if objective_of(config) == "flow" else config.schedule.to_dict(),
      "report": os.path.join(cache_dir, REPORT_NAME),
  }


# ============================================================================ command line


def define_flags(flag_values=flags.FLAGS, argv=None):
  """--config (ml_collections config file, locked) and --workdir, on `flag_values`.

  Defined only when the script runs (not on import), so that other experiment scripts that
  call `ensure_pretrained` can define their own --config/--workdir. `argv` (default
  sys.argv) is where ml_collections looks for the `--config.a.b=v` overrides.
  """
  config = config_flags.DEFINE_config_file(
      "config",
      None,
      "Experiment config file.",
      flag_values=flag_values,
      lock_config=True,
      sys_argv=argv,
  )
  workdir = flags.DEFINE_string(
      "workdir",
      None,
      "Output directory (models, report, logs). Default: the digits cache "
      "($ALIGNJAX_CACHE or ~/.cache/alignjax/digits).",
      flag_values=flag_values,
  )
  return config, workdir


def main(argv, config_flag, workdir_flag) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if config_flag.value is None:
    raise app.UsageError(
        "--config is required, e.g. " "--config=experiments/configs/pretrain_diffusion/digits.py"
    )
  workdir = workdir_flag.value
  if workdir is None:
    workdir = default_cache_dir(objective_of(config_flag.value))
  if not workdir.strip():
    raise app.UsageError("--workdir is empty: give the output directory, or leave the flag out")
  with scripts.exit_on_run_errors():
    report = pretrain(config_flag.value, workdir)
  summary = {
      k: report[k]
      for k in ("classifier_test_accuracy", "recognition_rate", "targets_met", "time_s")
  }
  print(json.dumps(summary, indent=2), flush=True)
  print(f"models and report in {workdir}", flush=True)


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, *_FLAGS), flags_parser=configs.flags_parser)
