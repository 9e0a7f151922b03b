r"""Pretraining of the embedded digits diffusion model and digits classifier, and its cache.

`ensure_pretrained` is what the digits experiments call for their base model: it returns the
paths of a cached UNet and classifier, pretraining them first (`pretrain`) only when the cache
lacks valid models for the requested config. `default_config(objective)` is the pretraining
config; experiments/configs/pretrain_diffusion/digits*.py build on it, and
experiments/pretrain_diffusion.py is the command line.

`pretrain` is linear: data -> UNet training (jit, donated; alignjax.diffusion.digits_training
eqs. 1-2, or 5 and 2 for the flow objective) -> classifier training -> class-conditional
samples for every guidance scale -> recognition rate (digits_training eq. 3) -> both models and
report.json saved.

Randomness: one key from (config.seed, config.prng_impl) split in three, for the UNet, the
classifier and the samples; evaluation i (guidance scale i) samples with fold_in(key, i).

Cache layout (the workdir): unet/ and classifier/ (io.save_model: config.json +
model.safetensors), report.json (accuracies, times, config, schedule; written last, so its
presence marks a complete run), metrics.jsonl, images/. The flow model's default cache is the
subdirectory flow/ of the eps cache (`default_cache_dir("flow")`), so the two never mix. A
cache is valid for a config when its report records the same config (up to the operational
fields of alignjax.run_identity) and both models load.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from alignjax import configs, finite, metrics, run_identity
from alignjax import workdir as workdir_lib
from alignjax.data import digits
from alignjax.diffusion import digits_training as dt
from alignjax.diffusion import schedules
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib

log = logging.getLogger(__name__)

PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
OBJECTIVES = dt.OBJECTIVES
FLOW_SAMPLERS = dt.FLOW_SAMPLERS
FLOW_SUBDIR = "flow"
REPORT_NAME = "report.json"
UNET_DIR = "unet"
CLASSIFIER_DIR = "classifier"
objective_of = dt.objective_of


def default_cache_dir(objective: str = "eps") -> str:
  """$ALIGNJAX_CACHE, else ~/.cache/alignjax/digits; the flow model lives in its flow/."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}: valid choices are {OBJECTIVES}")
  eps_dir = os.environ.get("ALIGNJAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "alignjax", "digits"
  )
  return eps_dir if objective == "eps" else os.path.join(eps_dir, FLOW_SUBDIR)


# ============================================================================ config


def default_config(objective: str = "eps") -> ml_collections.ConfigDict:
  """The full-size pretraining config of the eps model, or of its rectified-flow variant.

  The flow config is the eps one with the objective switched: the same UNet, classifier,
  optimiser, EMA and label dropout; no noise schedule; a time scale for the UNet's timestep
  input (digits_training eq. 4); Euler-ODE or SDE sampling instead of DDIM.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}: valid choices are {OBJECTIVES}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # PRNG for init, training and sampling: "rbg" compiles several times faster than
  # "threefry2x32" on CPU (XLA's RngBitGenerator instead of an unrolled hash).
  c.prng_impl = "rbg"

  # The noise schedule the UNet is trained with; alignjax.diffusion.schedules.make_schedule.
  c.schedule = dict(kind="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)

  # alignjax.models.unet.UNetConfig fields (image_size, channels, num_classes fixed by data).
  c.unet = dict(
      channels=(16, 32, 64),
      num_res_blocks=1,
      attention_resolutions=(2,),
      num_heads=4,
      num_groups=8,
      embed_dim=128,
      time_freq_dim=32,
  )
  # Epsilon-prediction training (digits_training eq. 1) with label dropout and an EMA (eq. 2).
  # Stop on the first NaN/inf loss or parameter (alignjax.finite).
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.train = dict(
      steps=1200,
      batch_size=64,
      learning_rate=2e-3,
      warmup_steps=100,
      end_lr_fraction=0.1,
      weight_decay=0.0,
      max_grad_norm=1.0,
      ema_decay=0.999,
      p_uncond=0.1,
      log_every=100,
  )

  # alignjax.models.classifier.ClassifierConfig fields, and its training.
  c.classifier = dict(channels=(32, 64), hidden_dim=128, num_groups=8)
  c.classifier_train = dict(
      steps=500, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, max_shift=1, noise_std=0.05
  )

  # Evaluation: class-conditional DDIM samples with classifier-free guidance.
  # The first guidance scale gives the headline recognition rate; the DDPO digits config
  # samples with the same num_steps / eta / scale.
  c.sample = dict(
      per_class=100,
      num_steps=20,
      eta=1.0,
      guidance_scales=(2.0, 1.0),
      clip_sample=1.0,
      batch_size=500,
  )
  c.targets = dict(classifier_accuracy=0.97, recognition_rate=0.80)
  if objective == "eps":
    return c

  # Rectified flow (digits_training eq. 5): no noise schedule, the UNet's timestep input is
  # tau = time_scale (1 - t) (eq. 4), samples by the Euler ODE ("ode") or the memoryless SDE
  # ("sde", flow eq. 6), with no eta / clip_sample.
  c.objective = "flow"
  del c["schedule"]
  c.flow = dict(time_scale=1000.0)
  c.sample = ml_collections.ConfigDict(
      dict(per_class=100, num_steps=20, sampler="ode", guidance_scales=(2.0, 1.0), batch_size=500)
  )
  return c


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


# ============================================================================ pipeline


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
  graphdef, ema, final_loss = dt.train_unet(config, x_train, y_train, schedule, unet_key, writer)
  finite.check_host_tree(jax.device_get(ema), "the pretrained UNet (EMA weights)")
  unet_time = time.time() - t0
  unet_model = nnx.merge(graphdef, ema)
  model_io.save_model(os.path.join(workdir, UNET_DIR), unet_model, unet_model.config)

  # ---------------------------------------------------------------- classifier
  t0 = time.time()
  ccfg, ct = dt.classifier_config(config), config.classifier_train
  init_key, train_key = jax.random.split(clf_key)
  clf = dt.init_model(lambda rngs: classifier_lib.DigitsClassifier(ccfg, rngs=rngs), init_key)
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
      x_gen = dt.sample_digits_flow(
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
      x_gen = dt.sample_digits(
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
    rate, per_class = dt.recognition(clf, images, cond)  # eq. 3
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
    config: pretraining ConfigDict (default: `default_config()`, the eps model, as
      experiments/configs/pretrain_diffusion/digits.py). A cache made with another config is
      retrained.

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
      log.info("Pretraining the digits models into %s (%s).", cache_dir, reason)
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
