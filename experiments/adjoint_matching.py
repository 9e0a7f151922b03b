r"""Adjoint Matching: fine-tune a diffusion or flow model on a differentiable reward.

  python -m experiments.adjoint_matching --config=experiments/configs/adjoint_matching/digits.py --workdir=runs/am_digits

A linear trainer (fork it rather than subclass it). Each iteration: draw prompts (host) →
sample memoryless trajectories of the fine-tuned model, solve the lean adjoint backwards
with the frozen base and regress the control onto it (one jitted step, state donated) →
metrics → checkpoint. Before and after, the base and fine-tuned models are evaluated on the
same held-out seeds: mean reward, recognition rate, and diversity

  D = (1/10) Σ_c mean_{i<j, c_i = c_j = c} ‖img_i − img_j‖₂      (images in [0, 1])      (1)

(mean pairwise L2 distance of the samples of one class, averaged over classes:
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
from alignjax.diffusion import digits_pretraining, flow, samplers
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib

scripts.make_importable(__file__, __package__)

from experiments import common

MODEL_KINDS = ("eps", "flow")
DIFFERENTIABLE_REWARDS = ("classifier", "brightness")


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
      "eval.num_samples",
  )
  configs.check_nonnegative(
      config, "sampling.guidance_scale", "sampling.clip_sample", "optimizer.max_grad_norm"
  )
  configs.check_choice(config, "model.kind", MODEL_KINDS)
  configs.check_choice(config, "finetune.mode", training.FINETUNE_MODES)
  if config.finetune.mode == "lora":
    configs.check_positive(config, "finetune.lora_rank")
  common.validate_model_and_reward(config)
  if config.reward.name not in DIFFERENTIABLE_REWARDS:
    raise configs.ConfigError(
        f"config.reward.name={config.reward.name!r}: Adjoint Matching needs ∇r; valid "
        f"choices are {', '.join(repr(r) for r in DIFFERENTIABLE_REWARDS)}"
    )
  if config.model.kind == "eps":
    configs.check_range(config, "sampling.eta", 0.0, 1.0, inclusive=(False, True))
  if config.am.num_timesteps > config.sampling.num_steps:
    raise configs.ConfigError(
        f"config.am.num_timesteps={config.am.num_timesteps} must be <= "
        f"config.sampling.num_steps={config.sampling.num_steps} (steps drawn per trajectory)"
    )
  common.check_eval_batches(config)
  common.validate_run_safety(config)
  configs.check_mesh_and_batch(
      config.mesh, num_devices, {"sampling.batch_size": config.sampling.batch_size}
  )


# ============================================================================ models


def load_models(config, mesh) -> tuple[common.DiffusionModels, float]:
  """(models, time_scale): the eps models of common.load_diffusion_models, or the flow
  variant (pretrained by experiments/configs/pretrain_diffusion/digits_flow.py into the flow/
  subdirectory of the cache). time_scale maps flow time to the UNet's timestep input."""
  if config.model.kind == "eps":
    return common.load_diffusion_models(config, mesh), 0.0
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
  models, time_scale = load_models(config, mesh)
  graphdef, base_params = nnx.split(models.unet)
  clf_graphdef, clf_params = nnx.split(models.classifier)
  sample_cfg, am_cfg = config.sampling, config.am
  null_cond, shape = models.num_classes, models.image_shape
  finetune = training.Finetune.from_config(config.finetune)
  clip_sample = sample_cfg.clip_sample or None  # 0 disables clipping of x̂_0
  optimizer = training.make_optimizer(config.optimizer)

  def model_fn(params):
    model = nnx.merge(graphdef, params)
    return lambda x, t, c: model(x, t, c)

  def reward_fn_builder(frozen):
    """r(x, cond) on diffusion-space x, built from the frozen classifier weights."""
    reward = common.make_reward(config.reward, nnx.merge(clf_graphdef, frozen["classifier"]))
    return lambda x, cond: reward(common.images_from(x), cond)

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
        models.schedule,
        optimizer,
        lam=am_cfg.lam,
        num_steps=sample_cfg.num_steps,
        shape=shape,
        eta=sample_cfg.eta,
        clip_sample=clip_sample,
        num_timesteps=am_cfg.num_timesteps,
        loss_clip=am_cfg.loss_clip,
    )

    def sample_final(trainable, frozen, key, cond):
      return am_ddpm.sample_chain(
          eps_builder(trainable, frozen),
          models.schedule,
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
    trainable, _ = finetune.split(base_params, init_key)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # own buffers: the state is donated
    return training.TrainState.create(trainable, optimizer, init_key)

  rules = common.sharding_rules(config)
  state_shardings = parallel.param_shardings(jax.eval_shape(init_state, base_params), mesh, rules)
  state = jax.jit(init_state, out_shardings=state_shardings)(base_params)
  frozen = {"base": base_params, "classifier": clf_params}
  frozen = jax.device_put(frozen, parallel.param_shardings(frozen, mesh, rules))

  # ---------------------------------------------------------------- jitted functions
  compiler_options = dict(config.compiler_options) or None
  update_fn = jax.jit(
      finite.guard(update, config.finite.policy),
      donate_argnums=0,
      out_shardings=(state_shardings, replicated, replicated),
      compiler_options=compiler_options,
  )
  sample_fn = jax.jit(sample_final, out_shardings=batch_sharding, compiler_options=compiler_options)
  decode_fn = jax.jit(common.images_from, out_shardings=batch_sharding)
  reward_eval = jax.jit(lambda frozen, x, cond: reward_fn_builder(frozen)(x, cond))
  logits_fn = jax.jit(lambda params, images: nnx.merge(clf_graphdef, params)(images))

  def draw_prompts(seed_key, num) -> jax.Array:
    """Class ids drawn on the host from a key, so every process draws the same ones."""
    seed = int(jax.random.randint(seed_key, (), 0, 2**31 - 1))
    cond = np.random.default_rng(seed).integers(0, models.num_classes, num, dtype=np.int32)
    return common.global_array(cond, batch_sharding)

  def evaluate(trainable) -> tuple[dict, np.ndarray]:
    """Held-out seeds, every digit in turn, the training sampler: reward, recognition, eq. 1;
    and an image grid with up to log.num_images / 10 samples of every digit."""
    rewards, images, conds, correct = [], [], [], []
    for b in range(config.eval.num_samples // sample_cfg.batch_size):
      cond = (np.arange(sample_cfg.batch_size) + b * sample_cfg.batch_size) % models.num_classes
      cond_global = common.global_array(cond.astype(np.int32), batch_sharding)
      x = sample_fn(trainable, frozen, jax.random.fold_in(eval_key, b), cond_global)
      rewards.append(common.to_host(reward_eval(frozen, x, cond_global)))
      batch_images = common.to_host(decode_fn(x))
      logits = common.to_host(logits_fn(frozen["classifier"], batch_images))
      correct.append(np.argmax(logits, -1) == cond)
      images.append(batch_images)
      conds.append(cond)
    images, conds = np.concatenate(images), np.concatenate(conds)
    result = {
        "reward": float(np.mean(np.concatenate(rewards))),
        "recognition": float(np.mean(np.concatenate(correct))),
        "diversity": metrics.within_class_diversity(images, conds),
    }  # eq. 1
    per_class = max(config.log.num_images // models.num_classes, 1)  # a grid row per digit
    grid = np.concatenate([images[conds == c][:per_class] for c in range(models.num_classes)])
    return result, grid

  # ---------------------------------------------------------------- restore or start
  ckpt = common.make_checkpointer(config, workdir, "experiments.adjoint_matching", models)
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
    writer.write_images(0, "eval_base", base_images[: config.log.num_images])
    writer.write_scalars(0, {f"eval/{k}": v for k, v in host["base"].items()})

  # ---------------------------------------------------------------- the loop
  for it in metrics.progress(
      range(host["iteration"], config.num_iterations),
      total=config.num_iterations - host["iteration"],
      desc="Adjoint Matching",
  ):
    t0 = time.perf_counter()
    key = jax.random.fold_in(train_key, it)
    cond = draw_prompts(jax.random.fold_in(key, 1), sample_cfg.batch_size)
    state, step_metrics, nonfinite = update_fn(state, frozen, jax.random.fold_in(key, 2), cond)
    common.check_finite(monitor, it + 1, nonfinite, ckpt, writer)
    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    scalars["seconds_iteration"] = time.perf_counter() - t0
    scalars["finite/skipped_iterations"] = monitor.skipped
    writer.write_scalars(it + 1, scalars)
    host["history"].append([it + 1, scalars["reward"]])
    if (it + 1) % config.log.image_every == 0:
      x = sample_fn(state.params, frozen, jax.random.fold_in(key, 3), cond)
      writer.write_images(it + 1, "train", common.to_host(decode_fn(x)))

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
  writer.write_images(config.num_iterations, "eval_final", final_images[: config.log.num_images])
  ckpt.wait_until_finished()
  ckpt.close()
  trainable = common.to_host_tree(state.params)
  if parallel.is_main_process():
    write_summary(workdir, host, final, config)
    common.export_finetuned(
        workdir,
        graphdef,
        models.unet.config,
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
  table = "\n".join(
      [
          f"| model (eval: {config.eval.num_samples} held-out seeds) | mean {name} reward | "
          "recognition rate | diversity (eq. 1) |",
          "|---|---|---|---|",
      ]
      + [
          f"| {label} | {r['reward']:.4f} | {r['recognition']:.3f} | {r['diversity']:.3f} |"
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
