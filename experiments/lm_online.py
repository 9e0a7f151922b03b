r"""Online RL over a language model: sample → judge → update with GRPO, RLOO or online IPO.

  python -m experiments.lm_online --config=experiments/configs/lm_online/arithmetic.py:algorithm=grpo --workdir=runs/grpo

A linear trainer (fork it rather than subclass it). Each iteration:
  1. G prompts of the training split (the same on every process count: a seeded draw per
     iteration, each process feeding its share of the global batch);
  2. k responses per prompt from the current policy (`alignjax.lm.rollout` eq. 1);
  3. the judge: a reward per response (GRPO, RLOO) or the win probability of each pair of
     responses to one prompt (online IPO, k = 2);
  4. the log-probs of the responses under the sampling policy π_old and the frozen reference
     π_ref (one scoring pass each, `alignjax.lm.rollout` eq. 3);
  5. `num_epochs` passes of minibatch updates on the algorithm's loss
     (`alignjax.algorithms.policy_gradient`: GRPO eq. 6, RLOO eq. 7 with eq. 2, online IPO
     eq. 8), each jitted with the state donated and guarded by the finite checks;
  6. metrics, evaluation every `eval.every` iterations, checkpoint.

RLOO's reward is KL-shaped as in Ahmadian et al. 2024: r̃ = r − β Σ_t (log π_old − log π_ref)
(a per-sequence estimate of KL(π ‖ π_ref), constant in θ). GRPO's KL is its own k3 term.

Evaluation: on held-out prompts, one response from the policy and one from π_ref each (fixed
keys), judged pairwise: the win rate P(policy ≻ π_ref) (ties ½; 0.5 at the start), and both
mean rewards. The reference is a frozen argument of every step, never in the optimizer state or
in a checkpoint; LoRA trains adapters over it (`config.finetune`).
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax import checkpoint, configs, finite, judges, metrics, parallel, scripts, training
from alignjax import workdir as workdir_lib
from alignjax.algorithms import nash_md, spo
from alignjax.algorithms import policy_gradient as pg
from alignjax.lm import rollout as rollout_lib
from alignjax.models import lora

scripts.make_importable(__file__, __package__)

from experiments import common, lm_common

ALGORITHMS = ("grpo", "rloo", "online_ipo", "nash_md", "spo")
NAMES = {
    "grpo": "GRPO",
    "rloo": "RLOO",
    "online_ipo": "online IPO",
    "nash_md": "Nash-MD",
    "spo": "SPO",
}


# ============================================================================ validation


def validate(config, num_devices: int) -> None:
  """Every check that can fail before compilation; each message names the key."""
  configs.check_choice(config, "algorithm", ALGORITHMS)
  configs.check_choice(config, "judge.name", lm_common.JUDGES)
  configs.check_integer(
      config,
      "num_iterations",
      "prompts_per_iteration",
      "num_samples",
      "num_epochs",
      "num_minibatches",
      "sampling.max_new_tokens",
      "eval.every",
      "eval.num_prompts",
      "checkpoint.every",
      "checkpoint.keep",
      "reference.pretrain_steps",
  )
  configs.check_positive(
      config,
      "num_iterations",
      "prompts_per_iteration",
      "num_samples",
      "num_epochs",
      "num_minibatches",
      "sampling.max_new_tokens",
      "eval.every",
      "eval.num_prompts",
      "reference.pretrain_steps",
  )
  configs.check_nonnegative(config, "sampling.temperature", "grpo.kl_coef", "rloo.kl_coef")
  configs.check_positive(config, "online_ipo.tau", "grpo.clip_eps")
  configs.check_choice(config, "grpo.length_norm", pg.LENGTH_NORMS)
  common.validate_run_safety(config)
  if config.algorithm == "nash_md":
    configs.check_range(config, "nash_md.beta", 0.0, 1.0)
    configs.check_positive(config, "nash_md.tau")
    configs.check_choice(config, "nash_md.kl_estimator", nash_md.KL_ESTIMATORS)
    configs.check_choice(config, "nash_md.opponent", ("mixture", "ema"))
    configs.check_range(config, "nash_md.ema_decay", 0.0, 1.0)
    if config.num_samples != 1:
      raise configs.ConfigError(
          f"config.num_samples={config.num_samples}: nash_md draws one response per prompt "
          "from the policy (its opponent from the mixture); set it to 1"
      )
  if config.algorithm == "spo":
    configs.check_choice(config, "spo.advantage", spo.ADVANTAGES)
    configs.check_nonnegative(config, "spo.kl_coef")
  if config.algorithm == "online_ipo" and config.num_samples != 2:
    raise configs.ConfigError(
        f"config.num_samples={config.num_samples}: online_ipo compares pairs, set it to 2"
    )
  if config.algorithm in ("grpo", "rloo", "spo") and config.num_samples < 2:
    raise configs.ConfigError(
        f"config.num_samples={config.num_samples}: {config.algorithm} normalises within a group "
        "of responses to one prompt; set it to >= 2"
    )
  batch = config.prompts_per_iteration * config.num_samples
  configs.check_divisible(
      config,
      "prompts_per_iteration",
      config.num_minibatches,
      "num_minibatches: every minibatch holds whole groups",
  )
  data_parallel = num_devices // (config.mesh.get("tensor", 1) or 1)
  if (batch // config.num_minibatches) % max(data_parallel, 1):
    raise configs.ConfigError(
        f"a minibatch of {batch // config.num_minibatches} responses (prompts_per_iteration × "
        f"num_samples / num_minibatches) does not split over {data_parallel} data-parallel "
        "devices"
    )


# ============================================================================ the losses


def grpo_objective(policy_logp, batch, options):
  """GRPO (policy_gradient eqs. 1, 3-6): PPO-clip on group-normalised advantages + k3 KL."""
  return pg.grpo_loss(
      policy_logp,
      batch["old_logp"],
      batch["ref_logp"],
      batch["advantages"],
      batch["mask"],
      clip_eps=options.clip_eps,
      kl_coef=options.kl_coef,
      length_norm=options.length_norm,
  )


def rloo_objective(policy_logp, batch, options):
  """RLOO (policy_gradient eqs. 2, 7) on the KL-shaped reward (module docstring)."""
  del options
  return pg.reinforce_loss(policy_logp, batch["advantages"], batch["mask"]), {}


def online_ipo_objective(policy_logp, batch, options):
  """Online IPO (policy_gradient eq. 8) on pairs of the current policy's responses."""
  return pg.online_ipo_loss(
      policy_logp, batch["ref_logp"], batch["mask"], batch["win_prob"], tau=options.tau
  )


def nash_md_objective(policy_logp, batch, options):
  """Nash-MD-PG (nash_md eqs. 2-3) against the geometric-mixture opponent's responses."""
  return nash_md.nash_md_loss(
      policy_logp,
      batch["ref_logp"],
      batch["mask"],
      batch["win_prob"],
      tau=options.tau,
      kl_estimator=options.kl_estimator,
  )


def spo_objective(policy_logp, batch, options):
  """SPO (spo eqs. 1, 3): each response's mean win probability against its group."""
  return spo.spo_loss(
      policy_logp,
      batch["old_logp"],
      batch["ref_logp"],
      batch["win_matrix"],
      batch["mask"],
      advantage=options.advantage,
      clip_eps=options.clip_eps,
      kl_coef=options.kl_coef,
      length_norm=options.length_norm,
  )


OBJECTIVES = {
    "grpo": grpo_objective,
    "rloo": rloo_objective,
    "online_ipo": online_ipo_objective,
    "nash_md": nash_md_objective,
    "spo": spo_objective,
}


def make_update(config, graphdef, finetune, optimizer):
  """The policy update `(state, lora_base, batch) -> (state, metrics)`: the algorithm's loss
  (OBJECTIVES) of the rollout's log-probs under θ = finetune.params(trainable, lora_base),
  one optimizer step. `batch`: {"rollout", "mask", "old_logp", "ref_logp"} and the judge's
  constants ("advantages" or "win_prob")."""
  objective, options = OBJECTIVES[config.algorithm], config[config.algorithm]
  chunks = dict(
      seq_chunk=config.scoring.seq_chunk or None, vocab_chunk=config.scoring.vocab_chunk or None
  )

  def update(state, lora_base, batch):
    def loss_fn(trainable):
      params = finetune.params(trainable, lora_base)
      logp = rollout_lib.response_log_probs(graphdef, params, batch["rollout"], **chunks)
      return objective(logp, batch, options)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(grads, optimizer)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

  return update


def needs_old_logp(config) -> bool:
  """Whether the update reads the sampling policy's log-probs (module docstring)."""
  if config.algorithm == "rloo":
    return config.rloo.kl_coef > 0
  return config.algorithm in ("grpo", "spo")


def track_iterates(tracked: dict, params, ema_decay: float) -> dict:
  """One iteration of the tracked iterates (see `train`): the running average of θ_0 .. θ_n
  ("count" = n) and the EMA with decay `ema_decay`."""
  out = dict(tracked)
  if "average" in tracked:
    n = tracked["count"] + 1.0
    out["average"] = jax.tree.map(lambda a, p: a + (p - a) / (n + 1.0), tracked["average"], params)
    out["count"] = n
  if "ema" in tracked:
    out["ema"] = jax.tree.map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, tracked["ema"], params
    )
  return out


def win_matrix(judge, c: judges.Completions, k: int) -> np.ndarray:
  """W [G, k, k]: W[g, i, j] = P(y_gi ≻ y_gj) for the k responses of each prompt (one judge
  call over every pair i < j; W[g, j, i] = 1 − W[g, i, j], the diagonal ½)."""
  g = len(c) // k
  i, j = np.triu_indices(k, 1)
  rows_a = (np.arange(g)[:, None] * k + i).reshape(-1)
  rows_b = (np.arange(g)[:, None] * k + j).reshape(-1)
  pick = lambda rows: judges.Completions(*(x[rows] for x in dataclasses.astuple(c)))
  p = np.asarray(judge.win_probability(pick(rows_a), pick(rows_b))).reshape(g, -1)
  w = np.full((g, k, k), 0.5, np.float32)
  w[:, i, j], w[:, j, i] = p, 1.0 - p
  return w


def advantages_and_targets(config, judge, r, old_logp, ref_logp, mesh, opponent=None):
  """The judge's verdicts turned into the loss's constants (rows sharded like the batch);
  and host metrics of the batch. `opponent`: Nash-MD's mixture responses."""
  k = config.num_samples
  c = lm_common.completions(r)
  if config.algorithm == "nash_md":
    win = np.asarray(judge.win_probability(c, lm_common.completions(opponent)))
    lm_common.check_judge(win)
    return {"win_prob": lm_common.global_rows(win, mesh)}, {"reward_mean": float(win.mean())}
  if config.algorithm == "spo":
    w = win_matrix(judge, c, k)
    lm_common.check_judge(w)
    return {"win_matrix": lm_common.global_rows(w, mesh)}, {
        "reward_mean": float(np.mean(np.asarray(spo.spo_rewards(jnp.asarray(w)))))
    }
  if config.algorithm == "online_ipo":
    pick = lambda rows: judges.Completions(*(x[rows] for x in dataclasses.astuple(c)))
    win = np.asarray(judge.win_probability(pick(slice(0, None, 2)), pick(slice(1, None, 2))))
    rewards = np.asarray(judge.reward(c)) if judge.has_reward else np.full(len(c), np.nan)
    return {"win_prob": lm_common.global_rows(win, mesh)}, {"reward_mean": float(np.mean(rewards))}
  rewards = np.asarray(judge.reward(c))
  shaped = rewards
  if config.algorithm == "rloo" and config.rloo.kl_coef > 0:
    seq_kl = lm_common.host(jnp.sum(old_logp - ref_logp, axis=1))
    shaped = rewards - config.rloo.kl_coef * seq_kl
  if config.algorithm == "grpo":
    adv = pg.group_advantages(jnp.asarray(shaped), k, normalize_std=config.grpo.normalize_std)
  else:
    adv = pg.rloo_advantages(jnp.asarray(shaped), k)
  return {"advantages": lm_common.global_rows(adv, mesh)}, {
      "reward_mean": float(np.mean(rewards)),
      "reward_std_within_groups": float(np.mean(np.std(rewards.reshape(-1, k), axis=1))),
  }


# ============================================================================ the run


def run(config, workdir: str, *, devices=None) -> dict:
  """Trains; returns {"base", "final" (eval dicts), "params", "history", "preempted"}."""
  parallel.initialize_distributed(config)
  devices = jax.devices() if devices is None else devices
  validate(config, len(devices))
  with workdir_lib.exclusive(workdir) as workdir:  # one run per workdir, from here on
    return train(config, workdir, devices)


def train(config, workdir: str, devices) -> dict:
  """`run` after validation, inside the workdir lock."""
  mesh = parallel.make_mesh(config.mesh, devices=devices)

  # ---------------------------------------------------------------- models and judge
  ref = lm_common.load_reference(config, mesh)
  graphdef = ref.graphdef
  judge = lm_common.make_judge(config.judge)
  # The evaluation's judge: `eval.judge` when named (e.g. the programmatic gold judge of an
  # RLHF run whose training judge is a learned reward model), else the training judge.
  eval_judge = lm_common.make_judge(config.eval.judge) if config.eval.judge.name else judge
  finetune = training.Finetune.from_config(config.finetune)
  sample_cfg = lm_common.sampling_config(config.sampling)
  eval_cfg = lm_common.sampling_config(config.sampling, temperature=config.eval.temperature)
  train_set, eval_set = lm_common.train_prompt_set(config), lm_common.eval_prompt_set(config)
  width = train_set.max_length
  prompts = lm_common.prompt_iterator(config, train_set, config.prompts_per_iteration)
  if len(eval_set) < config.eval.num_prompts:
    raise configs.ConfigError(
        f"config.eval.num_prompts={config.eval.num_prompts}: only {len(eval_set)} held-out "
        "prompts"
    )
  eval_batch = eval_set.batch(np.arange(config.eval.num_prompts))

  # ---------------------------------------------------------------- train state
  optimizer = training.make_optimizer(config.optimizer)
  init_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)

  plan = lora.lm_lora_plan(nnx.merge(graphdef, ref.params), tuple(config.finetune.lora_modules))

  init_state = lm_common.make_init_state(finetune, optimizer, plan, init_key)
  state_shapes = jax.eval_shape(init_state, ref.params)
  rules = lm_common.sharding_rules(config)
  state_shardings = parallel.param_shardings(state_shapes, mesh, rules)
  state = jax.jit(init_state, out_shardings=state_shardings)(ref.params)
  # Iterates the method keeps besides the state (checkpointed with it): SPO's average iterate
  # θ̄_n = θ̄_{n-1} + (θ_n − θ̄_{n-1}) / n, which its theory guarantees (a parameter average,
  # the practical proxy of the policy average), and Nash-EMA's opponent θ̃ ← d θ̃ + (1 − d) θ.
  tracked = {}
  if config.algorithm == "spo":
    tracked["average"] = jax.tree.map(jnp.copy, state.params)
    tracked["count"] = jnp.zeros((), jnp.float32)  # updates averaged in so far
  if config.algorithm == "nash_md" and config.nash_md.opponent == "ema":
    tracked["ema"] = jax.tree.map(jnp.copy, state.params)
  track = jax.jit(track_iterates, static_argnums=2, donate_argnums=0)
  lora_base = ref.params if finetune.mode == "lora" else {}
  policy_params = jax.jit(finetune.params)

  # ---------------------------------------------------------------- jitted functions
  chunks = dict(
      seq_chunk=config.scoring.seq_chunk or None, vocab_chunk=config.scoring.vocab_chunk or None
  )
  score = jax.jit(lambda params, r: rollout_lib.response_log_probs(graphdef, params, r, **chunks))
  update = make_update(config, graphdef, finetune, optimizer)
  update_fn = jax.jit(finite.guard(update, config.finite.policy), donate_argnums=0)

  def sample(params, batch, key, cfg, k):
    return rollout_lib.rollout(
        graphdef,
        params,
        batch["tokens"],
        batch["valid"],
        key,
        cfg,
        num_samples=k,
        max_prompt_len=width,
        min_bucket=width,
        mesh=mesh,
    )

  def sample_opponent(policy, batch, key):
    if "ema" in tracked:  # Nash-EMA: the opponent is the parameter EMA of the policy
      ema = policy_params(tracked["ema"], lora_base)
      return sample(ema, batch, key, sample_cfg, 1)
    beta = float(config.nash_md.beta)
    return rollout_lib.mixture_rollout(
        ((graphdef, policy), (graphdef, ref.params)),
        (1.0 - beta, beta),
        batch["tokens"],
        batch["valid"],
        key,
        sample_cfg,
        max_prompt_len=width,
        min_bucket=width,
        mesh=mesh,
    )

  def evaluate(trainable, check_judges=()) -> dict:
    """Win rate against the reference on the held-out prompts (fixed keys); `check_judges`
    are checked for eq. 1 of alignjax.judges on these samples first."""
    policy = sample(policy_params(trainable, lora_base), eval_batch, eval_key, eval_cfg, 1)
    reference = sample(ref.params, eval_batch, jax.random.fold_in(eval_key, 1), eval_cfg, 1)
    for j in check_judges:
      judges.check_judge(j, lm_common.completions(policy), lm_common.completions(reference))
    return lm_common.evaluate(policy, reference, eval_judge)

  # ---------------------------------------------------------------- restore or start
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      save_every=config.checkpoint.every,
      keep=config.checkpoint.keep,
      metadata=checkpoint.run_metadata("experiments.lm_online", config, base_model=ref.metadata),
      on_damage=config.checkpoint.on_damage,
  )
  host = {"step": 0, "base": None, "history": [], "eval_history": [], "data": prompts.state()}
  if ckpt.latest_step() is not None:
    restored, host = ckpt.restore({"train": state, "tracked": tracked})
    state, tracked = restored["train"], restored["tracked"]
    prompts.restore(host["data"])  # the data position: the next prompts are the unseen ones
    logging.info("Resumed from iteration %d in %s", host["step"], workdir)
  ckpt.install_preemption_handler()
  writer = metrics.MetricWriter(workdir)
  monitor = finite.Monitor.from_config(config.finite, host, unit="update", last_good=ckpt.last_good)
  if host["base"] is None:  # a broken judge stops the run here, before any update
    host["base"] = evaluate(state.params, (judge,) if eval_judge is judge else (judge, eval_judge))
    host["eval_history"].append([0, host["base"]["win_rate"], host["base"].get("reward", np.nan)])
    writer.write_scalars(0, {f"eval/{k}": v for k, v in host["base"].items()})

  # ---------------------------------------------------------------- the loop
  g, k = config.prompts_per_iteration, config.num_samples
  groups_per_minibatch = g // config.num_minibatches
  updates_done = host["step"] * config.num_epochs * config.num_minibatches
  for it in metrics.progress(
      range(host["step"], config.num_iterations),
      total=config.num_iterations - host["step"],
      desc=f"{config.algorithm} iterations",
  ):
    t0 = time.perf_counter()
    it_key = jax.random.fold_in(train_key, it)
    rng = np.random.default_rng([config.seed, it])
    batch = next(prompts)
    policy = policy_params(state.params, lora_base)
    r = sample(policy, batch, it_key, sample_cfg, k)
    opponent = None
    if config.algorithm == "nash_md":  # y' ~ π^β ∝ π_θ^(1-β) π_ref^β, token by token
      opponent = sample_opponent(policy, batch, jax.random.fold_in(it_key, 1))
    # π_old's log-probs only where the loss or the KL-shaped reward reads them (GRPO's and
    # SPO's ratios, RLOO's KL shaping): Nash-MD and online IPO never do.
    old_logp = score(policy, r) if needs_old_logp(config) else None
    ref_logp = score(ref.params, r)
    constants, batch_metrics = advantages_and_targets(
        config, judge, r, old_logp, ref_logp, mesh, opponent
    )
    full = {"rollout": r, "ref_logp": ref_logp, "mask": r.valid, **constants}
    if old_logp is not None:
      full["old_logp"] = old_logp

    step_metrics = []
    for _ in range(config.num_epochs):
      order = rng.permutation(g) if config.num_epochs > 1 else np.arange(g)
      for m in range(config.num_minibatches):
        groups = order[m * groups_per_minibatch : (m + 1) * groups_per_minibatch]
        rows = (groups[:, None] * k + np.arange(k)).reshape(-1)
        whole = config.num_minibatches == 1 and config.num_epochs == 1
        minibatch = full if whole else _take_rows(full, rows, groups, k, config.algorithm)
        state, out, nonfinite = update_fn(state, lora_base, minibatch)
        updates_done += 1
        common.check_finite(monitor, updates_done, nonfinite, ckpt, writer)
        step_metrics.append(out)
    tracked = track(tracked, state.params, config.nash_md.ema_decay if "ema" in tracked else 0.0)
    scalars = {
        key: float(np.mean([float(o[key]) for o in step_metrics])) for key in step_metrics[0]
    }
    scalars.update(batch_metrics)
    scalars["response_length"] = float(lm_common.host(r.valid).sum(axis=1).mean())
    scalars["seconds_iteration"] = time.perf_counter() - t0
    scalars["finite/skipped_updates"] = monitor.skipped
    writer.write_scalars(it + 1, scalars)
    host["history"].append([it + 1, scalars["reward_mean"]])
    if (it + 1) % config.eval.every == 0 or it + 1 == config.num_iterations:
      result = evaluate(state.params)
      if "average" in tracked:
        result.update({f"average_{k}": v for k, v in evaluate(tracked["average"]).items()})
      host["eval_history"].append([it + 1, result["win_rate"], result.get("reward", np.nan)])
      writer.write_scalars(it + 1, {f"eval/{key}": v for key, v in result.items()})
      logging.info("iteration %d: %s", it + 1, result)

    host.update(step=it + 1, finite=monitor.state_dict(), data=prompts.state())
    ckpt.maybe_save(
        it + 1, {"train": state, "tracked": tracked}, host, force=it + 1 == config.num_iterations
    )
    if ckpt.preemption_requested:
      logging.warning("Preemption requested: checkpoint saved at iteration %d, exiting.", it + 1)
      ckpt.wait_until_finished()
      writer.close()
      return {"preempted": True, "step": it + 1}

  # ---------------------------------------------------------------- final evaluation
  final = evaluate(state.params)
  if "average" in tracked:
    final.update({f"average_{k}": v for k, v in evaluate(tracked["average"]).items()})
  ckpt.wait_until_finished()
  ckpt.close()
  trainable = common.to_host_tree(state.params)
  if parallel.is_main_process():
    write_summary(workdir, host, final, config)
  lm_common.export(workdir, graphdef, finetune, state.params, lora_base, ref.model_dir)
  writer.close()
  return {
      "base": host["base"],
      "final": final,
      "params": trainable,
      "history": host["history"],
      "eval_history": host["eval_history"],
      **({"average": common.to_host_tree(tracked["average"])} if "average" in tracked else {}),
      "preempted": False,
  }


def _take_rows(full: dict, rows: np.ndarray, groups: np.ndarray, k: int, algorithm: str) -> dict:
  """The minibatch of whole groups (`rows` their responses; online IPO's win_prob is per
  pair, SPO's win matrix per group)."""
  out = {}
  for key, value in full.items():
    if key == "rollout":
      out[key] = value.rows(rows)
    elif key == "win_prob" and algorithm == "online_ipo":
      out[key] = value[rows[::2] // 2]
    elif key == "win_matrix":
      out[key] = value[groups]
    else:
      out[key] = value[rows]
  del k
  return out


def write_summary(workdir: str, host: dict, final: dict, config) -> str:
  """Prints and saves the reference vs fine-tuned table and the win-rate curve."""
  name = NAMES[config.algorithm]
  if config.algorithm == "nash_md" and config.nash_md.opponent == "ema":
    name = "Nash-EMA"
  name += f", {config.finetune.mode}, {config.num_iterations} iterations"
  rows = {name: final}
  if "average_win_rate" in final:
    rows[name + ", average iterate"] = {k[8:]: v for k, v in final.items() if k[:8] == "average_"}
  fields = {"algorithm": config.algorithm, "final": final, "iterations": config.num_iterations}
  return lm_common.write_summary(workdir, name, host, rows, config, unit="iteration", fields=fields)


if __name__ == "__main__":
  common.run_experiment_cli(run)
