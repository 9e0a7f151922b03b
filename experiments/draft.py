r"""DRaFT: fine-tune a diffusion model by backpropagating a differentiable reward through its sampler.

  python -m experiments.draft --config=experiments/configs/draft/digits.py --workdir=runs/draft
  python -m experiments.draft --config=experiments/configs/draft/sd15.py:variant=lv ...

A linear trainer (fork it rather than subclass it), the same for the embedded digits model and
a Stable Diffusion pipeline (`alignjax.diffusion.backend`). Each update: draw prompts (host;
balanced classes for digits) → one jitted DRaFT step (sample the DDIM chain, decode, reward,
gradient through the last K steps or the DRaFT-LV re-noisings, optimizer step; state donated)
→ metrics (reward, gradient norm, within-prompt diversity of the batch, reward queries so far)
→ checkpoint. Before and after training, the base and the fine-tuned model are evaluated on
the same held-out seeds. The maths is in alignjax/algorithms/draft.py; the diversity measure
is alignjax.metrics eq. 2.

The step's frozen argument holds everything that is not trained, so no weights are constants
of the compiled program: {"lora_base": θ₀ under LoRA ({} for full fine-tuning), "kl_base": θ₀
for the eq. 5 penalty under full fine-tuning ({} otherwise), "decoder": the VAE ({} for
digits), "reward": the reward model's weights}.
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

from alignjax import configs, finite, metrics, parallel, scripts, training
from alignjax import workdir as workdir_lib
from alignjax.algorithms import draft
from alignjax.diffusion import backend as backend_lib
from alignjax.diffusion import samplers
from alignjax.rewards import configured

scripts.make_importable(__file__, __package__)

from experiments import common

VARIANT_NAMES = {"full": "DRaFT", "k": "DRaFT-K", "1": "DRaFT-1", "lv": "DRaFT-LV"}


# ============================================================================ validation


def validate(config, num_devices: int) -> None:
  """Every check that can fail before compilation; each message names the key."""
  configs.check_integer(
      config,
      "num_updates",
      "sampling.num_steps",
      "sampling.batch_size",
      "checkpoint.every",
      "checkpoint.keep",
      "log.image_every",
      "log.num_images",
      "eval.num_samples",
  )
  configs.check_positive(
      config,
      "num_updates",
      "sampling.num_steps",
      "sampling.batch_size",
      "optimizer.learning_rate",
      "checkpoint.every",
      "checkpoint.keep",
      "log.image_every",
      "log.num_images",
      "eval.num_samples",
  )
  configs.check_fraction(config, "sampling.eta")
  configs.check_nonnegative(config, "sampling.guidance_scale", "draft.kl_weight")
  configs.check_choice(config, "draft.variant", draft.VARIANTS)
  configs.check_choice(config, "draft.remat_policy", sorted(draft.REMAT_POLICIES))
  configs.check_choice(config, "finetune.mode", training.FINETUNE_MODES)
  if config.finetune.mode == "lora":
    configs.check_positive(config, "finetune.lora_rank")
  common.validate_model_and_reward(config)
  configs.check_choice(config, "reward.name", differentiable_rewards(config))  # DRaFT needs ∇r
  if not config.draft.reward_scale or not np.isfinite(config.draft.reward_scale):
    raise configs.ConfigError(
        f"config.draft.reward_scale={config.draft.reward_scale!r}: " "must be finite and nonzero"
    )
  if config.draft.variant == "k":
    configs.check_integer(config, "draft.truncation_k")
    configs.check_range(config, "draft.truncation_k", 1, config.sampling.num_steps)
  if config.draft.variant == "lv":
    configs.check_integer(config, "draft.lv_samples")
    configs.check_positive(config, "draft.lv_samples")
  configs.check_mesh_and_batch(
      config.mesh,
      num_devices,
      {"sampling.batch_size": config.sampling.batch_size},
      num_processes=config.distributed.num_processes,
  )
  common.check_eval_batches(config)
  common.validate_run_safety(config)


def differentiable_rewards(config) -> tuple[str, ...]:
  """The rewards of the config's model family that DRaFT can differentiate."""
  family = common.REWARDS_BY_FAMILY[common.family(config)]
  return tuple(r for r in family if r in configured.DIFFERENTIABLE)


def draft_options(config) -> dict:
  """(truncation_k, lv_samples) of draft.make_update_fn for `config.draft.variant`."""
  d = config.draft
  return draft.variant_options(d.variant, d.truncation_k, d.lv_samples)


def balanced_prompts(batch: int, num_classes: int, seed: int) -> np.ndarray:
  """A shuffled batch holding every class ⌊B/num_classes⌋ or ⌈B/num_classes⌉ times."""
  return np.random.default_rng(seed).permutation(np.arange(batch) % num_classes).astype(np.int32)


def train_prompts(backend: backend_lib.DiffusionBackend, batch: int, seed: int):
  """The training PromptBatch of one update: balanced classes for the digits model (every
  digit equally often, `balanced_prompts`), else `backend.prompts.train` (uniform draws)."""
  if isinstance(backend.prompts, backend_lib.ClassPrompts):
    ids = balanced_prompts(batch, backend.prompts.num_classes, seed)
    return backend_lib.PromptBatch(
        ids, ids.copy(), ids.astype(np.int64), tuple(str(int(i)) for i in ids)
    )
  return backend.prompts.train(seed, batch)


# ============================================================================ the run


def run(config, workdir: str, *, devices=None) -> dict:
  """Trains; returns {"base", "final" (eval dicts), "params", "history", "preempted"}."""
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
  backend, reward = common.load_backend(config, mesh, rules)
  graphdef, base_params = nnx.split(backend.denoiser)
  schedule, sample_cfg, null_cond = backend.schedule, config.sampling, backend.null_cond
  finetune = training.Finetune.from_config(config.finetune)
  kl = config.draft.kl_weight > 0
  rewards_fn = common.RewardEvaluator(reward, mesh)  # its weights live replicated on the mesh

  # frozen: see the module docstring. LoRA is merged once per loss (draft "prepare"); every
  # chain step then builds the model from the merged parameters.
  def prepare(trainable, frozen):
    return finetune.params(trainable, frozen["lora_base"])

  def eps_fn_builder(prepared, frozen):
    return backend.eps_fn(nnx.merge(graphdef, prepared))

  def base_eps_fn_builder(frozen):
    base = frozen["kl_base" if finetune.mode == "full" else "lora_base"]
    return backend.eps_fn(nnx.merge(graphdef, base))

  def decode_builder(frozen):
    return lambda x: backend.decode(frozen["decoder"], x)

  def reward_builder(frozen):
    return lambda images, cond: reward.fn(frozen["reward"], images, cond)

  # ---------------------------------------------------------------- train state
  optimizer = training.make_optimizer(config.optimizer)
  init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  eval_key = jax.random.fold_in(eval_key, config.eval.seed)

  def init_state(base_params):
    trainable, lora_base = finetune.split(base_params, init_key, backend.lora_plan)
    frozen = {
        "lora_base": lora_base,
        "kl_base": (
            {}
            if finetune.mode == "lora" or not kl  # a copy: the state
            else jax.tree_util.tree_map(jnp.copy, base_params)
        ),
    }  # is donated
    return training.TrainState.create(trainable, optimizer, init_key), frozen

  state_shapes, frozen_shapes = jax.eval_shape(init_state, base_params)
  state_shardings = parallel.param_shardings(state_shapes, mesh, rules)
  frozen_shardings = parallel.param_shardings(frozen_shapes, mesh, rules)
  common.check_state_fits((state_shapes, frozen_shapes), (state_shardings, frozen_shardings))
  state, frozen = jax.jit(init_state, out_shardings=(state_shardings, frozen_shardings))(
      base_params
  )
  del base_params
  decoder_params = backend.decoder_params
  frozen["decoder"] = jax.device_put(
      decoder_params, parallel.param_shardings(decoder_params, mesh, rules)
  )
  frozen["reward"] = rewards_fn.reward.params

  # ---------------------------------------------------------------- jitted functions
  options = draft_options(config)
  update = draft.make_update_fn(
      eps_fn_builder,
      schedule,
      None,
      optimizer,
      num_steps=sample_cfg.num_steps,
      eta=sample_cfg.eta,
      guidance_scale=sample_cfg.guidance_scale,
      null_cond=null_cond,
      shape=backend.latent_shape,
      remat_policy=config.draft.remat_policy,
      reward_scale=config.draft.reward_scale,
      kl_weight=config.draft.kl_weight,
      base_eps_fn_builder=base_eps_fn_builder if kl else None,
      clip_sample=sample_cfg.clip_sample,
      decode_builder=decode_builder,
      reward_builder=reward_builder,
      prepare=prepare,
      **options,
  )
  compiler_options = dict(config.compiler_options) or None
  # metrics (scalars and the batch's latents) come back replicated
  update_fn = jax.jit(
      finite.guard(update, config.finite.policy),
      donate_argnums=0,
      compiler_options=compiler_options,
      out_shardings=(state_shardings, replicated, replicated),
  )
  queries_per_update = sample_cfg.batch_size * max(1, options["lv_samples"])

  def sample_batch(trainable, frozen, key, cond):
    prepared = prepare(trainable, frozen)
    # the module is built inside each scanned step (as draft's chain does): an NNX module
    # merged outside the scan cannot be used by the UNet's nnx.remat blocks inside it
    eps_fn = samplers.classifier_free_guidance(
        lambda x, t, c: eps_fn_builder(prepared, frozen)(x, t, c),
        sample_cfg.guidance_scale,
        null_cond,
    )
    return samplers.sample(
        eps_fn,
        schedule,
        cond,
        key,
        shape=backend.latent_shape,
        num_steps=sample_cfg.num_steps,
        eta=sample_cfg.eta,
        clip_sample=sample_cfg.clip_sample,
        latent_sharding=batch_sharding,
    ).final

  sample_fn = jax.jit(sample_batch, out_shardings=batch_sharding, compiler_options=compiler_options)
  decode_fn = jax.jit(backend.decode, out_shardings=batch_sharding)
  image_scale = config.log.get("image_scale", 4)  # 4: the 8x8 digits stay visible

  def evaluate(trainable) -> tuple[dict, np.ndarray]:
    """Reward and diversity on held-out seeds: fixed keys, the prompts in turn (every digit,
    or the prompt list)."""
    rewards_, images, labels = [], [], []
    for b in range(config.eval.num_samples // sample_cfg.batch_size):
      prompts = backend.prompts.eval(b, sample_cfg.batch_size)
      cond = backend.condition(prompts, batch_sharding)
      latents = sample_fn(trainable, frozen, jax.random.fold_in(eval_key, b), cond)
      batch = decode_fn(frozen["decoder"], latents)
      rewards_.append(rewards_fn(batch, cond))
      images.append(common.to_host(batch))
      labels.append(prompts.labels)
    r, images = np.concatenate(rewards_), np.concatenate(images)
    return {
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std()),
        "diversity": metrics.within_class_diversity(images, np.concatenate(labels)),
    }, images

  def write_images(step, name, images):
    writer.write_images(
        step,
        name,
        images[: config.log.num_images],
        ncols=backend.image_columns,
        scale=image_scale,
    )

  # ---------------------------------------------------------------- restore or start
  ckpt = common.make_checkpointer(config, workdir, "experiments.draft", backend)
  host = {"step": 0, "base": None, "history": []}
  if ckpt.latest_step() is not None:
    state, host = ckpt.restore(state)
    logging.info("Resumed from step %d in %s", host["step"], workdir)
  ckpt.install_preemption_handler()
  writer = metrics.MetricWriter(workdir)  # after the checkpoint proved to be this run's
  monitor = finite.Monitor.from_config(config.finite, host, unit="update", last_good=ckpt.last_good)
  if host["base"] is None:
    host["base"], base_images = evaluate(state.params)
    write_images(0, "eval_base", base_images)
    writer.write_scalars(0, {f"eval/{k}": v for k, v in host["base"].items()})

  # ---------------------------------------------------------------- the loop
  for step in metrics.progress(
      range(host["step"], config.num_updates),
      total=config.num_updates - host["step"],
      desc="DRaFT updates",
  ):
    t0 = time.perf_counter()
    step_key = jax.random.fold_in(train_key, step)
    seed = int(jax.random.randint(jax.random.fold_in(step_key, 1), (), 0, 2**31 - 1))
    prompts = train_prompts(backend, sample_cfg.batch_size, seed)
    cond = backend.condition(prompts, batch_sharding)
    state, step_metrics, nonfinite = update_fn(state, frozen, cond, step_key)
    common.check_finite(monitor, step + 1, nonfinite, ckpt, writer)
    images = common.to_host(decode_fn(frozen["decoder"], step_metrics.pop("samples")))
    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    scalars["diversity"] = metrics.within_class_diversity(images, prompts.labels)
    scalars["reward_queries"] = (step + 1) * queries_per_update
    scalars["seconds_update"] = time.perf_counter() - t0
    scalars["finite/skipped_updates"] = monitor.skipped
    writer.write_scalars(step + 1, scalars)
    host["history"].append([step + 1, scalars["reward_mean"], scalars["diversity"]])
    if (step + 1) % config.log.image_every == 0:
      write_images(step + 1, "train", images)

    host.update(step=step + 1, finite=monitor.state_dict())
    ckpt.maybe_save(step + 1, state, host, force=step + 1 == config.num_updates)
    if ckpt.preemption_requested:
      logging.warning("Preemption requested: checkpoint saved at step %d, exiting.", step + 1)
      ckpt.wait_until_finished()
      writer.close()
      return {"preempted": True, "step": step + 1}

  # ---------------------------------------------------------------- final evaluation
  final, final_images = evaluate(state.params)
  writer.write_scalars(config.num_updates, {f"eval/{k}": v for k, v in final.items()})
  write_images(config.num_updates, "eval_final", final_images)
  ckpt.wait_until_finished()
  ckpt.close()
  trainable = common.to_host_tree(state.params)
  if parallel.is_main_process():
    write_summary(workdir, reward.name, host, final, config)
    common.export_finetuned(
        workdir,
        graphdef,
        backend.export,
        trainable,
        common.to_host_tree(frozen["lora_base"]),
        finetune,
    )
  writer.close()
  return {
      "base": host["base"],
      "final": final,
      "params": trainable,
      "history": host["history"],
      "preempted": False,
  }


def write_summary(workdir: str, reward_name: str, host: dict, final: dict, config) -> str:
  """Prints and saves the base vs fine-tuned table and the reward/diversity curves."""
  name = VARIANT_NAMES[config.draft.variant]
  options = draft_options(config)
  if config.draft.variant == "k":
    name += f" (K={options['truncation_k']})"
  elif config.draft.variant == "lv":
    name += f" (n={options['lv_samples']})"
  name += f", {config.finetune.mode}, {config.num_updates} updates"
  queries = config.num_updates * config.sampling.batch_size * max(1, options["lv_samples"])
  row = lambda label, e: (
      f"| {label} | {e['reward_mean']:.4f} ± {e['reward_std']:.4f} | " f"{e['diversity']:.3f} |"
  )
  table = "\n".join(
      [
          f"| model (eval: {config.eval.num_samples} held-out seeds, DDIM "
          f"{config.sampling.num_steps} steps, eta={config.sampling.eta}) | "
          f"{reward_name} reward, mean ± std | within-class diversity |",
          "|---|---|---|",
          row("base", host["base"]),
          row(name, final),
          "",
          f"Training reward queries: {queries}. Diversity: mean pairwise L2 distance between "
          "samples of the same prompt (digit), images in [0, 1] (alignjax.metrics eq. 2).",
      ]
  )
  print(table, flush=True)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(
        {
            "base": host["base"],
            "final": final,
            "reward": reward_name,
            "variant": config.draft.variant,
            "updates": config.num_updates,
            "reward_queries": queries,
        },
        f,
        indent=2,
    )
  history = np.asarray(host["history"], np.float64).reshape(-1, 3)
  metrics.plot_curves(
      os.path.join(workdir, "reward_curve.png"),
      {"train reward (batch mean)": (history[:, 0], history[:, 1])},
      xlabel="update",
      ylabel=reward_name,
      title=name,
  )
  metrics.plot_curves(
      os.path.join(workdir, "diversity_curve.png"),
      {"within-class diversity (batch)": (history[:, 0], history[:, 2])},
      xlabel="update",
      ylabel="mean pairwise L2",
      title=name,
  )
  return table


if __name__ == "__main__":
  common.run_experiment_cli(run)
