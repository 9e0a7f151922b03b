r"""DDPO: fine-tune a diffusion model on a reward by policy gradient over the denoising chain.

  python -m experiments.ddpo --config=experiments/configs/ddpo/digits.py --workdir=runs/ddpo

A linear trainer (fork it rather than subclass it). Each round: sample trajectories (jit) →
decode → rewards (device or host thread) → per-prompt advantages (host) → inner epochs of
clipped importance-sampling updates (jit, state donated) → metrics → checkpoint. The maths is
in alignjax/algorithms/ddpo.py.
"""

from __future__ import annotations

import time

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax import configs, finite, metrics, parallel, scripts, training
from alignjax import workdir as workdir_lib
from alignjax.algorithms import ddpo
from alignjax.diffusion import backend as backend_lib
from alignjax.diffusion import samplers

scripts.make_importable(__file__, __package__)

from experiments import common

# ============================================================================ validation


def validate(config, num_devices: int) -> None:
  """Every check that can fail before compilation; each message names the key."""
  configs.check_positive(
      config,
      "num_rounds",
      "sampling.num_steps",
      "sampling.eta",
      "sampling.batch_size",
      "sampling.batches_per_round",
      "ddpo.clip_range",
      "ddpo.adv_clip_max",
      "ddpo.inner_epochs",
      "ddpo.num_minibatches",
      "ddpo.num_microbatches",
      "ddpo.buffer_size",
      "ddpo.min_count",
      "optimizer.learning_rate",
      "checkpoint.every",
      "checkpoint.keep",
      "log.image_every",
      "log.image_scale",
      "eval.num_samples",
      "eval.curve_samples",
  )
  configs.check_nonnegative(config, "sampling.guidance_scale", "eval.every")
  configs.check_integer(config, "log.image_scale", "eval.every")
  configs.check_fraction(config, "ddpo.timestep_fraction")
  configs.check_choice(config, "ddpo.objective", ddpo.OBJECTIVES)
  configs.check_choice(config, "ddpo.minibatch_loop", ddpo.MINIBATCH_LOOPS)
  configs.check_choice(config, "finetune.mode", training.FINETUNE_MODES)
  if config.finetune.mode == "lora":
    configs.check_positive(config, "finetune.lora_rank")
  common.validate_model_and_reward(config)
  common.validate_run_safety(config)
  round_batch = config.sampling.batch_size * config.sampling.batches_per_round
  if round_batch % config.ddpo.num_minibatches:
    raise configs.ConfigError(
        f"config.ddpo.num_minibatches={config.ddpo.num_minibatches} must divide the round's "
        f"{round_batch} samples (sampling.batch_size × sampling.batches_per_round)"
    )
  pairs = (round_batch // config.ddpo.num_minibatches) * ddpo.num_train_steps(
      config.sampling.num_steps,
      config.ddpo.timestep_fraction,
      schedule=common.base_schedule(config),
      eta=config.sampling.eta,
  )
  if pairs % config.ddpo.num_microbatches:
    raise configs.ConfigError(
        f"config.ddpo.num_microbatches={config.ddpo.num_microbatches} must divide the "
        f"{pairs} (sample, step) pairs of a minibatch"
    )
  common.check_eval_batches(config)
  configs.check_divisible(
      config,
      "eval.curve_samples",
      config.sampling.batch_size,
      "sampling.batch_size: evaluation samples in training-sized batches",
  )
  if config.eval.curve_samples > config.eval.num_samples:
    raise configs.ConfigError(
        f"config.eval.curve_samples={config.eval.curve_samples} must be <= "
        f"eval.num_samples={config.eval.num_samples}: the curve's seeds are the first of those"
    )
  configs.check_mesh_and_batch(
      config.mesh,
      num_devices,
      {
          "sampling.batch_size": config.sampling.batch_size,
          "ddpo.num_microbatches (pairs per microbatch)": pairs // config.ddpo.num_microbatches,
      },
  )


# ============================================================================ the run


def run(config, workdir: str, *, devices=None) -> dict:
  """Trains; returns {"base_reward", "final_reward", "base_diversity", "final_diversity",
  "params", "history", "eval_history"} (diversity: alignjax.metrics eq. 2 of the held-out
  samples; eval_history: [[round, mean reward on the first eval.curve_samples held-out seeds]]
  every eval.every rounds, with round 0 and the last round)."""
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
  schedule = backend.schedule
  sample_cfg = config.sampling
  null_cond = backend.null_cond

  finetune = training.Finetune.from_config(config.finetune)

  def eps_fn_builder(trainable, frozen):
    return backend.eps_fn(nnx.merge(graphdef, finetune.params(trainable, frozen)))

  # ---------------------------------------------------------------- train state
  optimizer = training.make_optimizer(config.optimizer)
  init_key, sample_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  eval_key = jax.random.fold_in(eval_key, config.eval.seed)

  def init_state(base_params):
    trainable, frozen = finetune.split(base_params, init_key, backend.lora_plan)
    return training.TrainState.create(trainable, optimizer, init_key), frozen

  state_shapes, frozen_shapes = jax.eval_shape(init_state, base_params)
  state_shardings = parallel.param_shardings(state_shapes, mesh, rules)
  frozen_shardings = parallel.param_shardings(frozen_shapes, mesh, rules)
  common.check_state_fits((state_shapes, frozen_shapes), (state_shardings, frozen_shardings))
  state, frozen = jax.jit(init_state, out_shardings=(state_shardings, frozen_shardings))(
      base_params
  )
  del base_params

  # ---------------------------------------------------------------- jitted functions
  def sample_batch(trainable, frozen, key, cond):
    eps_fn = samplers.classifier_free_guidance(
        eps_fn_builder(trainable, frozen), sample_cfg.guidance_scale, null_cond
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
    )

  def draw_prompts(seed_key, num) -> backend_lib.PromptBatch:
    """Prompts drawn on the host from a key, so every process draws the same ones."""
    return backend.prompts.train(int(jax.random.randint(seed_key, (), 0, 2**31 - 1)), num)

  cond_shape = jax.eval_shape(
      lambda c: c, backend.condition(backend.prompts.eval(0, sample_cfg.batch_size))
  )
  traj_sharding = jax.tree_util.tree_map(
      lambda _: batch_sharding,
      jax.eval_shape(sample_batch, state.params, frozen, sample_key, cond_shape),
  )
  traj_sharding = traj_sharding.replace(
      timesteps=replicated, prev_timesteps=replicated, stds=replicated
  )
  compiler_options = dict(config.compiler_options) or None
  sample_fn = jax.jit(sample_batch, out_shardings=traj_sharding, compiler_options=compiler_options)
  decoder_params = backend.decoder_params
  decode_fn = jax.jit(backend.decode, out_shardings=batch_sharding)
  epoch_fn = jax.jit(
      finite.guard(
          ddpo.make_epoch_fn(
              eps_fn_builder,
              schedule,
              optimizer,
              objective=config.ddpo.objective,
              clip_range=config.ddpo.clip_range,
              eta=sample_cfg.eta,
              guidance_scale=sample_cfg.guidance_scale,
              null_cond=null_cond,
              timestep_fraction=config.ddpo.timestep_fraction,
              num_minibatches=config.ddpo.num_minibatches,
              num_microbatches=config.ddpo.num_microbatches,
              clip_sample=sample_cfg.clip_sample,
              mesh=mesh,
              data_axes=parallel.DATA_AXES,
              minibatch_loop=config.ddpo.minibatch_loop,
          ),
          config.finite.policy,
      ),
      donate_argnums=0,
      out_shardings=(state_shardings, replicated, replicated),
      compiler_options=compiler_options,
  )
  rewards_fn = common.RewardEvaluator(reward, mesh)

  def evaluate(trainable, num_samples):
    """(rewards [num_samples], within-prompt diversity (alignjax.metrics eq. 2), images) on
    held-out seeds: fixed keys, the prompts in turn (every digit, or the prompt list), same
    sampler as training. Batch b always draws the same seeds, so a smaller `num_samples`
    evaluates the first of the same seeds."""
    rewards_, images, labels = [], [], []
    for b in range(num_samples // sample_cfg.batch_size):
      prompts = backend.prompts.eval(b, sample_cfg.batch_size)
      cond = backend.condition(prompts, batch_sharding)
      traj = sample_fn(trainable, frozen, jax.random.fold_in(eval_key, b), cond)
      batch = decode_fn(decoder_params, traj.final)
      rewards_.append(rewards_fn(batch, cond))
      images.append(common.to_host(batch))
      labels.append(prompts.labels)
    images = np.concatenate(images)
    diversity = metrics.within_class_diversity(images, np.concatenate(labels))
    return np.concatenate(rewards_), diversity, images

  # The reward curve's held-out points: the mean over the first eval.curve_samples seeds, every
  # eval.every rounds (0: only before and after training), the same seeds each time.
  curve_samples = config.eval.curve_samples

  def curve_point(round_, rewards_) -> None:
    host["eval_history"].append([round_, float(np.mean(rewards_[:curve_samples]))])

  def write_eval_images(step, name, images):
    # eval prompts cycle through the prompts: for digits, column c shows digit c
    writer.write_images(
        step,
        name,
        images[: config.log.num_images],
        ncols=backend.image_columns,
        scale=config.log.image_scale,
    )

  # ---------------------------------------------------------------- restore or start
  ckpt = common.make_checkpointer(config, workdir, "experiments.ddpo", backend)
  host = {
      "round": 0,
      "tracker": None,
      "base_reward": None,
      "base_diversity": None,
      "history": [],
      "eval_history": [],  # [[round, held-out mean reward on the curve's seeds], ...]
  }
  if ckpt.latest_step() is not None:
    state, host = ckpt.restore(state)
    host.setdefault("eval_history", [])  # written before the held-out curve existed
    logging.info("Resumed from round %d in %s", host["round"], workdir)
  ckpt.install_preemption_handler()
  writer = metrics.MetricWriter(workdir)  # after the checkpoint proved to be this run's
  monitor = finite.Monitor.from_config(config.finite, host, unit="round", last_good=ckpt.last_good)
  tracker = (
      ddpo.PerPromptStatTracker.from_state_dict(host["tracker"])
      if host["tracker"]
      else ddpo.PerPromptStatTracker(config.ddpo.buffer_size, config.ddpo.min_count)
  )
  if host["base_reward"] is None:
    base_rewards, host["base_diversity"], base_images = evaluate(
        state.params, config.eval.num_samples
    )
    host["base_reward"] = float(np.mean(base_rewards))
    curve_point(0, base_rewards)
    write_eval_images(0, "eval_base", base_images)
    writer.write_scalars(
        0,
        {
            "eval/reward_mean": host["base_reward"],
            "eval/diversity": host["base_diversity"],
            "eval/num_seeds": config.eval.num_samples,
            "eval/curve_reward_mean": host["eval_history"][-1][1],
        },
    )

  # ---------------------------------------------------------------- the loop
  final_eval = None  # (rewards, diversity, images) of the last round on all eval seeds
  for round_ in metrics.progress(
      range(host["round"], config.num_rounds),
      total=config.num_rounds - host["round"],
      desc="DDPO rounds",
  ):
    t0 = time.perf_counter()
    round_key = jax.random.fold_in(sample_key, round_)
    trajs, pending, keys = [], [], []
    for b in range(sample_cfg.batches_per_round):  # host rewards overlap the next batch
      batch_key = jax.random.fold_in(round_key, b)
      prompts = draw_prompts(jax.random.fold_in(batch_key, 1), sample_cfg.batch_size)
      cond = backend.condition(prompts, batch_sharding)
      traj = sample_fn(state.params, frozen, batch_key, cond)
      trajs.append(traj)
      keys.append(prompts.keys)
      pending.append(rewards_fn.submit(decode_fn(decoder_params, traj.final), cond))
    traj = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *trajs)
    traj = traj.replace(
        timesteps=trajs[0].timesteps, prev_timesteps=trajs[0].prev_timesteps, stds=trajs[0].stds
    )
    rewards = np.concatenate([p.result() for p in pending])
    if config.ddpo.per_prompt_stat_tracking:
      advantages = tracker.update(list(np.concatenate(keys)), rewards)
    else:
      advantages = ddpo.batch_advantages(rewards)
    advantages = np.clip(advantages, -config.ddpo.adv_clip_max, config.ddpo.adv_clip_max)
    advantages = backend_lib.global_array(advantages, batch_sharding)
    t_sample = time.perf_counter() - t0

    epochs = []  # every inner epoch's metrics, each [num_minibatches]
    for _ in range(config.ddpo.inner_epochs):
      state, epoch_metrics, nonfinite = epoch_fn(state, frozen, traj, advantages)
      common.check_finite(monitor, round_ + 1, nonfinite, ckpt, writer)
      epochs.append(epoch_metrics)
    epochs = jax.device_get(epochs)
    scalars = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **{k: float(np.mean([e[k] for e in epochs])) for k in epochs[0]},
        "seconds_sampling": t_sample,
        "seconds_round": time.perf_counter() - t0,
        "finite/skipped_rounds": monitor.skipped,
    }
    scalars["ratio_min"] = float(min(np.min(e["ratio_min"]) for e in epochs))
    scalars["ratio_max"] = float(max(np.max(e["ratio_max"]) for e in epochs))
    # The first minibatch is on-policy: |ρ − 1| there measures sampler/trainer mismatch.
    first = epochs[0]
    scalars["on_policy_ratio_error"] = float(
        max(abs(first["ratio_max"][0] - 1.0), abs(first["ratio_min"][0] - 1.0))
    )
    if len(epochs) > 1:  # each inner epoch's means, to see the policy drift within a round
      for i, e in enumerate(epochs):
        scalars.update({f"inner_epoch_{i}/{k}": float(np.mean(v)) for k, v in e.items()})
    writer.write_scalars(round_ + 1, scalars)
    host["history"].append([round_ + 1, scalars["reward_mean"]])
    if (round_ + 1) % config.log.image_every == 0:
      images = common.to_host(decode_fn(decoder_params, traj.final))
      writer.write_images(
          round_ + 1,
          "train",
          images[: config.log.num_images],
          ncols=backend.image_columns,
          scale=config.log.image_scale,
      )
    # Held-out points for the curve, saved with the round's checkpoint; the last round is
    # evaluated on all eval.num_samples seeds, the final evaluation below.
    last = round_ + 1 == config.num_rounds
    if last or (config.eval.every and (round_ + 1) % config.eval.every == 0):
      eval_rewards, eval_diversity, eval_images = evaluate(
          state.params, config.eval.num_samples if last else curve_samples
      )
      curve_point(round_ + 1, eval_rewards)
      if last:
        final_eval = eval_rewards, eval_diversity, eval_images
      else:
        writer.write_scalars(
            round_ + 1,
            {
                "eval/reward_mean": host["eval_history"][-1][1],
                "eval/diversity": eval_diversity,
                "eval/num_seeds": curve_samples,
                "eval/curve_reward_mean": host["eval_history"][-1][1],
            },
        )

    host.update(round=round_ + 1, tracker=tracker.state_dict(), finite=monitor.state_dict())
    ckpt.maybe_save(round_ + 1, state, host, force=round_ + 1 == config.num_rounds)
    if ckpt.preemption_requested:
      logging.warning("Preemption requested: checkpoint saved at round %d, exiting.", round_ + 1)
      ckpt.wait_until_finished()
      writer.close()
      return {"preempted": True, "round": round_ + 1}

  # ---------------------------------------------------------------- final evaluation
  if final_eval is None:  # started again after its last round: evaluated afresh
    final_eval = evaluate(state.params, config.eval.num_samples)
    if not host["eval_history"] or host["eval_history"][-1][0] != config.num_rounds:
      curve_point(config.num_rounds, final_eval[0])
  final_rewards, final_diversity, final_images = final_eval
  final_reward = float(np.mean(final_rewards))
  eval_history = host["eval_history"]
  writer.write_scalars(
      config.num_rounds,
      {
          "eval/reward_mean": final_reward,
          "eval/diversity": final_diversity,
          "eval/num_seeds": config.eval.num_samples,
          "eval/curve_reward_mean": eval_history[-1][1],
      },
  )
  write_eval_images(config.num_rounds, "eval_final", final_images)
  ckpt.wait_until_finished()
  ckpt.close()
  trainable = common.to_host_tree(state.params)
  if parallel.is_main_process():
    common.write_summary(
        workdir, "DDPO", reward.name, host, final_reward, config, eval_history=eval_history
    )
    common.export_finetuned(
        workdir, graphdef, backend.export, trainable, common.to_host_tree(frozen), finetune
    )
  writer.close()
  return {
      "base_reward": host["base_reward"],
      "final_reward": final_reward,
      # None when resumed from a checkpoint written before diversity was recorded
      "base_diversity": host.get("base_diversity"),
      "final_diversity": final_diversity,
      "params": trainable,
      "history": host["history"],
      "eval_history": eval_history,
  }


if __name__ == "__main__":
  common.run_experiment_cli(run)
