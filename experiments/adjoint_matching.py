r"""Adjoint Matching: fine-tune a diffusion or flow model on a differentiable reward.

  python -m experiments.adjoint_matching --config=experiments/configs/adjoint_matching/digits.py --workdir=runs/am_digits
  python -m experiments.adjoint_matching --config=experiments/configs/adjoint_matching/sd15.py ...

The same script runs on the embedded digits model and on a Stable Diffusion pipeline, both
behind `alignjax.diffusion.backend` (`model.family`; Stable Diffusion with `model.kind=eps`
only): the reward differentiates through the backend's decoder (the VAE for SD). A linear trainer (fork it rather than subclass it). Each iteration: draw prompts (host) →
sample memoryless trajectories of the fine-tuned model, solve the lean adjoint backwards
with the frozen base and regress the control onto it (one jitted step, state donated) →
metrics → checkpoint. Before and after, the base and fine-tuned models are evaluated on the
same held-out seeds: mean reward, recognition rate (digits only: the digits classifier), and
diversity

  D = mean_c mean_{i<j, c_i = c_j = c} ‖img_i − img_j‖₂      (images in [0, 1])      (1)

(mean pairwise L2 distance of the samples of one class or prompt, averaged over them:
`alignjax.metrics.within_class_diversity`). The maths is
in alignjax/algorithms/adjoint_matching_ddpm.py (the DDPM chain, eta = 1, `model.kind=eps`)
and alignjax/algorithms/adjoint_matching.py (rectified flow, memoryless SDE, `model.kind=flow`;
the UNet's time input follows alignjax/diffusion/flow.py eq. 8).
"""

from __future__ import annotations

import json
import os
import time

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax import checkpoint, configs, finite, metrics, parallel, scripts, testing, training
from alignjax import workdir as workdir_lib
from alignjax.algorithms import adjoint_matching as am_flow
from alignjax.algorithms import adjoint_matching_ddpm as am_ddpm
from alignjax.diffusion import backend as backend_lib
from alignjax.diffusion import digits_pretraining, flow, samplers
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib
from alignjax.rewards import configured

scripts.make_importable(__file__, __package__)

from experiments import common

MODEL_KINDS = ("eps", "flow")


def differentiable_rewards(family: str) -> tuple[str, ...]:
  """The rewards of a model family that Adjoint Matching can use (it needs ∇r)."""
  return tuple(r for r in common.REWARDS_BY_FAMILY[family] if r in configured.DIFFERENTIABLE)


DIFFERENTIABLE_REWARDS = differentiable_rewards("digits")


# ============================================================================ validation


def validate(config, num_devices: int) -> None:
  """Every check that can fail before compilation; each message names the key."""
  configs.check_positive(
      config,
      "num_iterations",
      "sampling.num_steps",
      "sampling.batch_size",
      "am.lam",
      "am.num_timesteps",
      "am.num_microbatches",
      "optimizer.learning_rate",
      "checkpoint.every",
      "checkpoint.keep",
      "log.image_every",
      "log.num_images",
      "eval.num_samples",
  )
  configs.check_positive(config, "am.loss_clip", allow_inf=True)  # inf: no clipping
  configs.check_integer(
      config,
      "num_iterations",
      "sampling.num_steps",
      "sampling.batch_size",
      "am.num_timesteps",
      "am.num_microbatches",
      "eval.num_samples",
  )
  configs.check_nonnegative(
      config, "sampling.guidance_scale", "sampling.clip_sample", "optimizer.max_grad_norm"
  )
  configs.check_choice(config, "model.kind", MODEL_KINDS)
  if "family" in config.model:
    configs.check_choice(config, "model.family", common.FAMILIES)
  family = common.family(config)
  if family == "stable_diffusion" and config.model.kind != "eps":
    raise configs.ConfigError(
        f"config.model.kind={config.model.kind!r}: Stable Diffusion is an eps-prediction "
        "model; model.family='stable_diffusion' runs with model.kind='eps' only (the flow "
        "variant is for the digits model)"
    )
  configs.check_choice(config, "finetune.mode", training.FINETUNE_MODES)
  if config.finetune.mode == "lora":
    configs.check_positive(config, "finetune.lora_rank")
  valid = differentiable_rewards(family)
  if config.reward.name not in valid:
    raise configs.ConfigError(
        f"config.reward.name={config.reward.name!r}: Adjoint Matching needs ∇r; valid "
        f"choices are {', '.join(repr(r) for r in valid)}"
    )
  common.validate_model_and_reward(config)
  if config.model.kind == "eps":
    configs.check_range(config, "sampling.eta", 0.0, 1.0, inclusive=(False, True))
  if config.am.num_timesteps > config.sampling.num_steps:
    raise configs.ConfigError(
        f"config.am.num_timesteps={config.am.num_timesteps} must be <= "
        f"config.sampling.num_steps={config.sampling.num_steps} (steps drawn per trajectory)"
    )
  pairs = config.sampling.batch_size * config.am.num_timesteps
  if config.model.kind == "flow" and config.am.num_microbatches != 1:
    raise configs.ConfigError(
        f"config.am.num_microbatches={config.am.num_microbatches}: the flow model's update "
        "has no gradient accumulation; use 1 with model.kind='flow'"
    )
  if pairs % config.am.num_microbatches:
    raise configs.ConfigError(
        f"config.am.num_microbatches={config.am.num_microbatches} must divide the {pairs} "
        "(sample, step) pairs of an update (sampling.batch_size × am.num_timesteps)"
    )
  common.check_eval_batches(config)
  common.validate_run_safety(config)
  configs.check_mesh_and_batch(
      config.mesh,
      num_devices,
      {
          "sampling.batch_size": config.sampling.batch_size,
          "am.num_microbatches (pairs per microbatch)": pairs // config.am.num_microbatches,
      },
  )


# ============================================================================ models


def _digits_export(directory: str, unet) -> None:
  model_io.save_model(directory, unet, unet.config)


def load_models(config, mesh, rules):
  """(backend, reward, classifier, time_scale): the base model behind
  `alignjax.diffusion.backend`'s interface, the configured reward (weights as arguments),
  the digits classifier for the recognition rate (None for Stable Diffusion) and time_scale,
  which maps flow time to the UNet's timestep input (0 for eps models).

  Digits: the eps models of common.load_diffusion_models, or the flow variant (pretrained by
  experiments/configs/pretrain_diffusion/digits_flow.py into the flow/ subdirectory of the
  cache). Stable Diffusion: `common.load_backend`."""
  if common.family(config) == "stable_diffusion":
    backend, reward = common.load_backend(config, mesh, rules)
    return backend, reward, None, 0.0
  if config.model.kind == "eps":
    models, time_scale = common.load_diffusion_models(config, mesh), 0.0
  else:
    models, time_scale = _load_digits_flow(config)
  backend = backend_lib.digits_backend(models.unet, models.schedule, models.base, _digits_export)
  reward = configured.make_reward(config.reward, "digits", classifier=models.classifier)
  return backend, reward, models.classifier, time_scale


def _load_digits_flow(config) -> tuple[common.DiffusionModels, float]:
  flow_config = digits_pretraining.default_config("flow")
  if config.model.init == "random":
    unet = testing.tiny_unet(seed=config.seed)
    classifier = testing.tiny_classifier(seed=config.seed + 1)
    base = {
        "init": "random",
        "kind": "flow",
        "preset": config.model.random_preset,
        "seed": config.seed,
    }
  else:
    cache = config.model.cache_dir
    cache = os.path.join(cache, digits_pretraining.FLOW_SUBDIR) if cache else None
    paths = digits_pretraining.ensure_pretrained(cache, flow_config)
    unet = model_io.load_model(paths["unet_dir"], unet_lib.UNet, unet_lib.UNetConfig)
    classifier = model_io.load_model(
        paths["classifier_dir"], classifier_lib.DigitsClassifier, classifier_lib.ClassifierConfig
    )
    base = {
        "init": "pretrained",
        "kind": "flow",
        **checkpoint.frozen_model_metadata(paths["unet_dir"]),
        "classifier": checkpoint.frozen_model_metadata(paths["classifier_dir"]),  # the reward's
    }
  cfg = unet.config
  models = common.DiffusionModels(
      unet=unet,
      classifier=classifier,
      schedule=None,
      image_shape=(cfg.image_size, cfg.image_size, cfg.in_channels),
      num_classes=cfg.num_classes,
      base=base,
  )
  return models, float(flow_config.flow.time_scale)


# ============================================================================ the run


def run(config, workdir: str, *, devices=None) -> dict:
  """Trains and returns {"base", "final" (eval dicts), "params", "history"}."""
  # ---------------------------------------------------------------- mesh and processes
  parallel.initialize_distributed(config)
  devices = jax.devices() if devices is None else devices
  validate(config, len(devices))
  with workdir_lib.exclusive(workdir) as workdir:  # one run per workdir, from here on
    return train(config, workdir, devices)


def train(config, workdir: str, devices) -> dict:
  """`run` after validation, inside the workdir lock."""
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  batch_sharding = parallel.batch_sharding(mesh)
  replicated = parallel.replicated(mesh)

  # ---------------------------------------------------------------- models and reward
  rules = common.sharding_rules(config)
  backend, reward, classifier, time_scale = load_models(config, mesh, rules)
  graphdef, base_params = nnx.split(backend.denoiser)
  sample_cfg, am_cfg = config.sampling, config.am
  null_cond, shape, schedule = backend.null_cond, backend.latent_shape, backend.schedule
  finetune = training.Finetune.from_config(config.finetune)
  clip_sample = sample_cfg.clip_sample or None  # 0 disables clipping of x̂_0
  optimizer = training.make_optimizer(config.optimizer)

  def model_fn(params):
    return backend.eps_fn(nnx.merge(graphdef, params))

  def reward_fn_builder(frozen):
    """r(x, cond) on the model's space x: decoded (the VAE for SD) inside the differentiated
    path, the reward's and the decoder's weights taken from `frozen` (jit arguments)."""
    return lambda x, cond: reward.fn(frozen["reward"], backend.decode(frozen["decoder"], x), cond)

  if config.model.kind == "eps":

    def guided_eps(params):
      return samplers.classifier_free_guidance(
          model_fn(params), sample_cfg.guidance_scale, null_cond
      )

    eps_builder = lambda trainable, frozen: guided_eps(finetune.params(trainable, frozen["base"]))
    base_eps_builder = lambda frozen: guided_eps(frozen["base"])
    update = am_ddpm.make_update_fn(
        eps_builder,
        base_eps_builder,
        reward_fn_builder,
        schedule,
        optimizer,
        lam=am_cfg.lam,
        num_steps=sample_cfg.num_steps,
        shape=shape,
        eta=sample_cfg.eta,
        clip_sample=clip_sample,
        num_timesteps=am_cfg.num_timesteps,
        loss_clip=am_cfg.loss_clip,
        num_microbatches=am_cfg.num_microbatches,
    )

    def sample_final(trainable, frozen, key, cond):
      return am_ddpm.sample_chain(
          eps_builder(trainable, frozen),
          schedule,
          cond,
          key,
          shape=shape,
          num_steps=sample_cfg.num_steps,
          eta=sample_cfg.eta,
          clip_sample=clip_sample,
      ).final

  else:

    def velocity(params, cond):
      vel = flow.guided_velocity(
          flow.unet_velocity(model_fn(params), time_scale), sample_cfg.guidance_scale, null_cond
      )
      return lambda x, t: vel(x, t, cond)

    def reward_of(frozen, cond):
      reward_fn = reward_fn_builder(frozen)
      return lambda x: reward_fn(x, cond)

    update = am_flow.make_conditional_update_fn(
        lambda trainable, frozen, cond: velocity(finetune.params(trainable, frozen["base"]), cond),
        lambda frozen, cond: velocity(frozen["base"], cond),
        reward_of,
        optimizer,
        lam=am_cfg.lam,
        num_steps=sample_cfg.num_steps,
        shape=shape,
        num_timesteps=am_cfg.num_timesteps,
        loss_clip=am_cfg.loss_clip,
    )

    def sample_final(trainable, frozen, key, cond):
      k_x0, k_sde = jax.random.split(key)
      x0 = jax.random.normal(k_x0, (cond.shape[0],) + shape, jnp.float32)
      vel = velocity(finetune.params(trainable, frozen["base"]), cond)
      return am_flow.sample_memoryless(vel, x0, k_sde, num_steps=sample_cfg.num_steps).final

  # ---------------------------------------------------------------- train state
  init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  eval_key = jax.random.fold_in(eval_key, config.eval.seed)

  def init_state(base_params):
    trainable, _ = finetune.split(base_params, init_key, backend.lora_plan)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # own buffers: the state is donated
    return training.TrainState.create(trainable, optimizer, init_key)

  state_shapes = jax.eval_shape(init_state, base_params)
  state_shardings = parallel.param_shardings(state_shapes, mesh, rules)
  # The frozen: the base (ε_base, and θ₀ of LoRA), the reward's and the decoder's weights.
  frozen = {"base": base_params, "reward": reward.params, "decoder": backend.decoder_params}
  frozen_shardings = parallel.param_shardings(frozen, mesh, rules)
  common.check_state_fits((state_shapes, frozen), (state_shardings, frozen_shardings))
  state = jax.jit(init_state, out_shardings=state_shardings)(base_params)
  frozen = jax.device_put(frozen, frozen_shardings)
  del base_params
  if classifier is not None:  # the digits classifier, for the recognition rate
    clf_graphdef, clf_params = nnx.split(classifier)
    clf_params = jax.device_put(clf_params, replicated)

  # ---------------------------------------------------------------- jitted functions
  compiler_options = dict(config.compiler_options) or None
  update_fn = jax.jit(
      finite.guard(update, config.finite.policy),
      donate_argnums=0,
      out_shardings=(state_shardings, replicated, replicated),
      compiler_options=compiler_options,
  )
  sample_fn = jax.jit(sample_final, out_shardings=batch_sharding, compiler_options=compiler_options)
  decode_fn = jax.jit(backend.decode, out_shardings=batch_sharding)
  reward_eval = jax.jit(lambda frozen, x, cond: reward_fn_builder(frozen)(x, cond))
  if classifier is not None:
    logits_fn = jax.jit(lambda params, images: nnx.merge(clf_graphdef, params)(images))

  def draw_prompts(seed_key, num) -> backend_lib.PromptBatch:
    """Prompts drawn on the host from a key, so every process draws the same ones."""
    return backend.prompts.train(int(jax.random.randint(seed_key, (), 0, 2**31 - 1)), num)

  def evaluate(trainable) -> tuple[dict, np.ndarray]:
    """Held-out seeds, the prompts in turn (every digit, or the prompt list), the training
    sampler: reward, recognition (digits), eq. 1; and the images to log (digits: a grid with
    up to log.num_images / 10 samples of every digit)."""
    rewards, images, labels, correct = [], [], [], []
    for b in range(config.eval.num_samples // sample_cfg.batch_size):
      prompts = backend.prompts.eval(b, sample_cfg.batch_size)
      cond = backend.condition(prompts, batch_sharding)
      x = sample_fn(trainable, frozen, jax.random.fold_in(eval_key, b), cond)
      rewards.append(common.to_host(reward_eval(frozen, x, cond)))
      batch_images = common.to_host(decode_fn(frozen["decoder"], x))
      if classifier is not None:
        logits = common.to_host(logits_fn(clf_params, batch_images))
        correct.append(np.argmax(logits, -1) == prompts.labels)
      images.append(batch_images)
      labels.append(prompts.labels)
    images, labels = np.concatenate(images), np.concatenate(labels)
    result = {"reward": float(np.mean(np.concatenate(rewards)))}
    if classifier is not None:
      result["recognition"] = float(np.mean(np.concatenate(correct)))
    result["diversity"] = metrics.within_class_diversity(images, labels)  # eq. 1
    if backend.family != "digits":
      return result, images[: config.log.num_images]
    num_classes = backend.prompts.num_classes
    per_class = max(config.log.num_images // num_classes, 1)  # a grid row per digit
    grid = np.concatenate([images[labels == c][:per_class] for c in range(num_classes)])
    return result, grid

  def write_images(step, name, images):
    ncols = None if backend.family == "digits" else backend.image_columns
    writer.write_images(step, name, images[: config.log.num_images], ncols=ncols)

  # ---------------------------------------------------------------- restore or start
  ckpt = common.make_checkpointer(config, workdir, "experiments.adjoint_matching", backend)
  host = {"iteration": 0, "base": None, "history": []}
  if ckpt.latest_step() is not None:
    state, host = ckpt.restore(state)
    logging.info("Resumed from iteration %d in %s", host["iteration"], workdir)
  ckpt.install_preemption_handler()
  writer = metrics.MetricWriter(workdir)  # after the checkpoint proved to be this run's
  monitor = finite.Monitor.from_config(
      config.finite, host, unit="iteration", last_good=ckpt.last_good
  )
  if host["base"] is None:
    host["base"], base_images = evaluate(state.params)
    write_images(0, "eval_base", base_images)
    writer.write_scalars(0, {f"eval/{k}": v for k, v in host["base"].items()})

  # ---------------------------------------------------------------- the loop
  for it in metrics.progress(
      range(host["iteration"], config.num_iterations),
      total=config.num_iterations - host["iteration"],
      desc="Adjoint Matching",
  ):
    t0 = time.perf_counter()
    key = jax.random.fold_in(train_key, it)
    prompts = draw_prompts(jax.random.fold_in(key, 1), sample_cfg.batch_size)
    cond = backend.condition(prompts, batch_sharding)
    state, step_metrics, nonfinite = update_fn(state, frozen, jax.random.fold_in(key, 2), cond)
    common.check_finite(monitor, it + 1, nonfinite, ckpt, writer)
    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    scalars["seconds_iteration"] = time.perf_counter() - t0
    scalars["finite/skipped_iterations"] = monitor.skipped
    writer.write_scalars(it + 1, scalars)
    host["history"].append([it + 1, scalars["reward"]])
    if (it + 1) % config.log.image_every == 0:
      x = sample_fn(state.params, frozen, jax.random.fold_in(key, 3), cond)
      write_images(it + 1, "train", common.to_host(decode_fn(frozen["decoder"], x)))

    host.update(iteration=it + 1, finite=monitor.state_dict())
    ckpt.maybe_save(it + 1, state, host, force=it + 1 == config.num_iterations)
    if ckpt.preemption_requested:
      logging.warning("Preemption requested: checkpoint saved at iteration %d, exiting.", it + 1)
      ckpt.wait_until_finished()
      writer.close()
      return {"preempted": True, "iteration": it + 1}

  # ---------------------------------------------------------------- final evaluation
  final, final_images = evaluate(state.params)
  writer.write_scalars(config.num_iterations, {f"eval/{k}": v for k, v in final.items()})
  write_images(config.num_iterations, "eval_final", final_images)
  ckpt.wait_until_finished()
  ckpt.close()
  trainable = common.to_host_tree(state.params)
  if parallel.is_main_process():
    write_summary(workdir, host, final, config)
    common.export_finetuned(
        workdir,
        graphdef,
        backend.export,
        trainable,
        common.to_host_tree(frozen["base"]),
        finetune,
    )
  writer.close()
  return {"base": host["base"], "final": final, "params": trainable, "history": host["history"]}


def write_summary(workdir: str, host: dict, final: dict, config) -> str:
  """Prints and saves the base vs fine-tuned table and the reward curve (process 0 only)."""
  base = host["base"]
  name = config.reward.name
  rows = [
      ("base", base),
      (
          f"Adjoint Matching ({config.model.kind}, λ={config.am.lam:g}, "
          f"{config.num_iterations} iterations)",
          final,
      ),
  ]
  recognition = "recognition" in base  # the digits classifier's; none for Stable Diffusion
  head = f"| model (eval: {config.eval.num_samples} held-out seeds) | mean {name} reward | "
  head += "recognition rate | " * recognition + "diversity (eq. 1) |"
  table = "\n".join(
      [head, "|---|---|" + "---|" * recognition + "---|"]
      + [
          f"| {label} | {r['reward']:.4f} | "
          + (f"{r['recognition']:.3f} | " if recognition else "")
          + f"{r['diversity']:.3f} |"
          for label, r in rows
      ]
  )
  print(table, flush=True)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(
        {
            "base": base,
            "final": final,
            "reward": name,
            "model": config.model.kind,
            "lam": config.am.lam,
            "iterations": config.num_iterations,
        },
        f,
        indent=2,
    )
  steps, values = zip(*host["history"]) if host["history"] else ((), ())
  metrics.plot_curves(
      os.path.join(workdir, "reward_curve.png"),
      {"train reward (batch mean)": (list(steps), list(values))},
      xlabel="iteration",
      ylabel=name,
  )
  return table


if __name__ == "__main__":
  common.run_experiment_cli(run)
