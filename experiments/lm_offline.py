r"""Offline preference optimisation of a language model: DPO, cDPO, RPO, IPO or SPPO on fixed pairs.

  python -m experiments.lm_offline --config=experiments/configs/lm_offline/arithmetic.py:loss=dpo --workdir=runs/dpo

A linear trainer (fork it rather than subclass it):
  1. the preference pairs: `data.preferences` (JSONL: prompt, chosen, rejected and optionally
     a probability label), or on the embedded task K = `data.samples_per_prompt` responses per
     training prompt sampled from the reference π_ref, of which the judge's best and worst
     (by a round robin of its pairwise preferences) form the pair (ties dropped: a pair
     teaches nothing when the judge is indifferent; with `data.min_reward_gap` > 0 also the
     pairs whose rewards differ by less), written to <workdir>/preferences.jsonl; the pairs' probability
     label is the judge's P(chosen ≻ rejected);
  2. log π_ref of every chosen and rejected response, once (the reference is frozen);
  3. `num_steps` minibatch updates on the loss (`alignjax.algorithms.dpo`: DPO / cDPO eq. 2,
     RPO eq. 8, IPO eq. 4, SPPO on pairs eq. 6), each jitted with the state donated and guarded by the
     finite checks; the minibatches walk seeded epoch permutations (alignjax.data.BatchIterator)
     whose position is saved in every checkpoint, so a resumed run continues where it stopped;
  4. evaluation every `eval.every` steps: the win rate of the policy's samples over the
     reference's on held-out prompts, by the same judge (as `experiments.lm_online`).
"""

from __future__ import annotations

import json
import os
import time

from absl import logging

import jax
import numpy as np
import optax
from flax import nnx

from alignjax import checkpoint, configs, finite, judges, metrics, parallel, scripts, training
from alignjax.data import synthetic_language as lang
import alignjax.data as data_lib
from alignjax import workdir as workdir_lib
from alignjax.algorithms import dpo
from alignjax.lm import rollout as rollout_lib
from alignjax.models import lora
from alignjax.lm import scoring
from alignjax.models import convert

scripts.make_importable(__file__, __package__)

from experiments import common, lm_common

LOSSES = ("dpo", "rpo", "ipo", "sppo")


# ============================================================================ validation


def validate(config, num_devices: int) -> None:
  """Every check that can fail before compilation; each message names the key."""
  configs.check_choice(config, "loss", LOSSES)
  configs.check_choice(config, "judge.name", lm_common.JUDGES)
  configs.check_integer(
      config,
      "num_steps",
      "batch_size",
      "data.num_prompts",
      "sampling.max_new_tokens",
      "eval.every",
      "eval.num_prompts",
      "checkpoint.every",
      "checkpoint.keep",
      "reference.pretrain_steps",
  )
  configs.check_positive(
      config,
      "num_steps",
      "batch_size",
      "data.num_prompts",
      "sampling.max_new_tokens",
      "eval.every",
      "eval.num_prompts",
      "dpo.beta",
      "rpo.beta",
      "ipo.tau",
      "sppo.eta",
  )
  configs.check_fraction(config, "dpo.label_smoothing", inclusive=(True, False))
  configs.check_nonnegative(config, "data.min_reward_gap", "rpo.alpha")
  configs.check_choice(config, "data.chosen", ("sampled", "gold"))
  k = config.data.get("samples_per_prompt", 2)
  if isinstance(k, bool) or not isinstance(k, int) or k < 2:
    raise configs.ConfigError(
        f"config.data.samples_per_prompt={k!r}: an integer >= 2 (reference samples per "
        "training prompt; the best and the worst of them form the pair)"
    )
  common.validate_run_safety(config)
  data_parallel = num_devices // (config.mesh.get("tensor", 1) or 1)
  if config.batch_size % max(data_parallel, 1):
    raise configs.ConfigError(
        f"config.batch_size={config.batch_size} does not split over {data_parallel} "
        "data-parallel devices"
    )


# ============================================================================ the losses


def dpo_objective(lp, batch, options):
  """DPO / cDPO (dpo eqs. 1-3): label_smoothing ε > 0 is cDPO."""
  return dpo.dpo_loss(
      lp["chosen"],
      lp["rejected"],
      batch["ref_chosen"],
      batch["ref_rejected"],
      beta=options.beta,
      label_smoothing=options.label_smoothing,
  )


def rpo_objective(lp, batch, options):
  """RPO (dpo eq. 8): DPO plus α times the chosen responses' per-token NLL."""
  return dpo.rpo_loss(
      lp["chosen"],
      lp["rejected"],
      batch["ref_chosen"],
      batch["ref_rejected"],
      batch["chosen"][2].sum(axis=-1),
      beta=options.beta,
      alpha=options.alpha,
  )


def ipo_objective(lp, batch, options):
  """IPO (dpo eq. 4)."""
  return dpo.ipo_loss(
      lp["chosen"], lp["rejected"], batch["ref_chosen"], batch["ref_rejected"], tau=options.tau
  )


def sppo_objective(lp, batch, options):
  """SPPO on pairs (dpo eqs. 5-6) with the judge's P(chosen ≻ rejected) as the soft label."""
  return dpo.sppo_pair_loss(
      lp["chosen"],
      lp["rejected"],
      batch["ref_chosen"],
      batch["ref_rejected"],
      batch["p_chosen"],
      eta=options.eta,
  )


OBJECTIVES = {
    "dpo": dpo_objective,
    "rpo": rpo_objective,
    "ipo": ipo_objective,
    "sppo": sppo_objective,
}


# ============================================================================ the pairs


class PairSet:
  """Preference pairs as host arrays, a `Batchable` of `alignjax.data.BatchIterator`:
  batch(rows) = {"chosen": (tokens, valid, mask), "rejected": (...), "p_chosen",
  "ref_chosen", "ref_rejected"} (the reference's log-probs of whole responses, computed once)."""

  def __init__(self, chosen, rejected, p_chosen):
    self.chosen, self.rejected = tuple(map(np.asarray, chosen)), tuple(map(np.asarray, rejected))
    self.p_chosen = np.asarray(p_chosen, np.float32)
    self.ref_chosen = self.ref_rejected = None

  def __len__(self) -> int:
    return len(self.p_chosen)

  def score_reference(self, seq_score, ref_params, mesh, batch_size: int) -> None:
    """log π_ref of every chosen and rejected response, in batches of `batch_size` rows."""
    sides = []
    for seqs in (self.chosen, self.rejected):
      sums = []
      for start in range(0, len(self), batch_size):
        rows = np.arange(start, start + batch_size) % len(self)  # whole batches
        args = [lm_common.global_rows(x[rows], mesh) for x in seqs]
        sums.append(lm_common.host(seq_score(ref_params, *args)))
      sides.append(np.concatenate(sums)[: len(self)])
    self.ref_chosen, self.ref_rejected = sides

  def batch(self, rows) -> dict:
    return {
        "chosen": tuple(x[rows] for x in self.chosen),
        "rejected": tuple(x[rows] for x in self.rejected),
        "p_chosen": self.p_chosen[rows],
        "ref_chosen": self.ref_chosen[rows],
        "ref_rejected": self.ref_rejected[rows],
    }


def embedded_pairs(config, ref, judge, width, key, mesh) -> tuple[PairSet, list[dict]]:
  """Pairs from K = data.samples_per_prompt reference samples per training prompt: the one
  the judge ranks best against the one it ranks worst (each sample's score is its mean
  P(sample ≻ other) over the K − 1 others, a round robin; K = 2 is the plain judged pair). Ties
  are dropped; with data.min_reward_gap > 0 also pairs whose rewards differ by less. Returns the
  pairs and their records for preferences.jsonl."""
  prompts = lm_common.embedded_prompts(config, "train")
  order = np.random.default_rng(config.seed).permutation(len(prompts))
  prompts = [prompts[i] for i in order[: config.data.num_prompts]]
  k = int(config.data.get("samples_per_prompt", 2))
  cfg = lm_common.sampling_config(config.sampling)
  tokens, valid = lm_common.encode_prompts(prompts, width)
  r = rollout_lib.rollout(
      ref.graphdef,
      ref.params,
      tokens,
      valid,
      key,
      cfg,
      num_samples=k,
      max_prompt_len=width,
      min_bucket=width,
      mesh=mesh,
  )
  if config.data.chosen == "gold":
    return gold_pairs(config, prompts, lm_common.completions(r.rows(slice(0, None, k))), judge)
  samples = [lm_common.completions(r.rows(slice(i, None, k))) for i in range(k)]
  judges.check_judge(judge, samples[0], samples[1])  # eq. 1 of alignjax.judges, on a sample
  best, worst = round_robin_extremes(judge, samples)
  rows = np.arange(len(prompts)) * k
  a, b = r.rows(rows + best), r.rows(rows + worst)
  ca, cb = lm_common.completions(a), lm_common.completions(b)
  p_a = np.asarray(judge.win_probability(ca, cb))
  decisive = p_a != 0.5
  if config.data.min_reward_gap > 0:  # only pairs the judge's rewards separate clearly
    gap = np.abs(np.asarray(judge.reward(ca)) - np.asarray(judge.reward(cb)))
    decisive &= gap >= config.data.min_reward_gap
  keep = np.flatnonzero(decisive)
  a_wins = p_a[keep] > 0.5
  seq_a = [lm_common.host(x)[keep] for x in rollout_lib.sequences(a)]
  seq_b = [lm_common.host(x)[keep] for x in rollout_lib.sequences(b)]
  pick = lambda x, y: np.where(a_wins.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  chosen = [pick(x, y) for x, y in zip(seq_a, seq_b)]
  rejected = [pick(y, x) for x, y in zip(seq_a, seq_b)]
  p_chosen = np.where(a_wins, p_a[keep], 1 - p_a[keep]).astype(np.float32)
  texts_a = lm_common.decode_texts(a.tokens, a.valid)
  texts_b = lm_common.decode_texts(b.tokens, b.valid)
  records = [
      {
          "prompt": prompts[i],
          "chosen": texts_a[i] if w else texts_b[i],
          "rejected": texts_b[i] if w else texts_a[i],
          "p_chosen": float(p),
      }
      for i, w, p in zip(keep, a_wins, p_chosen)
  ]
  return PairSet(chosen, rejected, p_chosen), records


def round_robin_extremes(judge, samples: list) -> tuple[np.ndarray, np.ndarray]:
  """For K ≥ 2 completion sets of the same prompts (`judges.Completions`, one per sample
  index), the index of each prompt's best and worst sample by the round-robin score
  s_i = Σ_{j ≠ i} P(y_i ≻ y_j); ties go to the lower index for the best and the higher for the
  worst, so that K = 2 with P(y_0 ≻ y_1) ≠ ½ pairs sample 0 with sample 1."""
  k = len(samples)
  score = np.zeros((samples[0].tokens.shape[0], k))
  for i in range(k):
    for j in range(i + 1, k):
      p = np.asarray(judge.win_probability(samples[i], samples[j]), np.float64)
      score[:, i] += p
      score[:, j] += 1.0 - p
  best = np.argmax(score, axis=1)
  worst = k - 1 - np.argmax(score[:, ::-1] * -1.0, axis=1)
  return best, worst


def gold_pairs(config, prompts, sampled, judge) -> tuple[PairSet, list[dict]]:
  """data.chosen = "gold": the correct answer (chosen) against each wrong reference sample
  (rejected), as in self-play fine-tuning on demonstrations (SPIN, Chen et al. 2024); the
  label is the judge's P(gold ≻ sample)."""
  n = sampled.tokens.shape[1]
  gold = [lang.encode(str(lang.true_answer(p)), bos=False, eos=True) for p in prompts]
  tokens = np.full((len(prompts), n), lang.PAD_ID, np.int32)
  valid = np.zeros((len(prompts), n), bool)
  for i, ids in enumerate(gold):
    tokens[i, : min(len(ids), n)], valid[i, : min(len(ids), n)] = ids[:n], True
  gold_c = judges.Completions(sampled.prompt_tokens, sampled.prompt_valid, tokens, valid)
  p = np.asarray(judge.win_probability(gold_c, sampled))
  keep = np.flatnonzero(p > 0.5)  # the sample is worse than the answer
  seq = lambda c: [
      np.concatenate([c.prompt_tokens, c.tokens], 1)[keep],
      np.concatenate([c.prompt_valid, c.valid], 1)[keep],
      np.concatenate([np.zeros_like(c.prompt_valid), c.valid], 1)[keep],
  ]
  texts = lm_common.decode_texts(sampled.tokens, sampled.valid)
  records = [
      {
          "prompt": prompts[i],
          "chosen": str(lang.true_answer(prompts[i])),
          "rejected": texts[i],
          "p_chosen": float(p[i]),
      }
      for i in keep
  ]
  return PairSet(seq(gold_c), seq(sampled), p[keep]), records


def file_pairs(config) -> PairSet:
  """Pairs of `config.data.preferences` (JSONL: prompt, chosen, rejected, optionally the
  probability label `data.label_key`), tokenised by the reference's tokenizer."""
  dc = config.data
  tokenizer = convert.load_tokenizer(config.reference.model_dir)
  prefs = data_lib.load_preferences(
      dc.preferences,
      tokenizer,
      max_length=int(dc.max_length),
      max_prompt_length=int(dc.max_prompt_length),
      label_key=dc.get("label_key", "p_chosen"),
      on_too_long=dc.get("on_too_long", "error"),
  )
  whole = prefs.batch(np.arange(len(prefs)))
  side = lambda d: (d["tokens"], d["valid"], d["mask"])
  return PairSet(side(whole["chosen"]), side(whole["rejected"]), whole["label"])


# ============================================================================ the run


def run(config, workdir: str, *, devices=None) -> dict:
  """Trains; returns {"base", "final" (eval dicts), "params", "history", "preempted"}."""
  parallel.initialize_distributed(config)
  devices = jax.devices() if devices is None else devices
  validate(config, len(devices))
  with workdir_lib.exclusive(workdir) as workdir:
    return train(config, workdir, devices)


def train(config, workdir: str, devices) -> dict:
  """`run` after validation, inside the workdir lock."""
  mesh = parallel.make_mesh(config.mesh, devices=devices)

  # ---------------------------------------------------------------- models, judge, pairs
  ref = lm_common.load_reference(config, mesh)
  graphdef = ref.graphdef
  judge = lm_common.make_judge(config.judge)
  finetune = training.Finetune.from_config(config.finetune)
  init_key, data_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  eval_set = lm_common.eval_prompt_set(config)
  width = eval_set.max_length
  if config.data.get("preferences"):
    pairs, where = file_pairs(config), config.data.preferences
  else:
    pairs, records = embedded_pairs(config, ref, judge, width, data_key, mesh)
    where = f"{config.data.num_prompts} prompts"
    if parallel.is_main_process():
      with open(os.path.join(workdir, "preferences.jsonl"), "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
  num_pairs = len(pairs)
  if num_pairs < config.batch_size:
    raise configs.ConfigError(
        f"only {num_pairs} decisive pairs from {where}, fewer than "
        f"config.batch_size={config.batch_size}: raise data.num_prompts or lower batch_size"
    )
  seq_score = jax.jit(
      lambda params, tokens, valid, mask: scoring.score(graphdef, params, tokens, valid, mask).sums
  )
  pairs.score_reference(seq_score, ref.params, mesh, config.batch_size)
  batches = data_lib.BatchIterator(
      pairs, config.batch_size, seed=config.seed, process_index=0, process_count=1
  )

  # ---------------------------------------------------------------- train state
  optimizer = training.make_optimizer(config.optimizer)

  plan = lora.lm_lora_plan(nnx.merge(graphdef, ref.params), tuple(config.finetune.lora_modules))

  init_state = lm_common.make_init_state(finetune, optimizer, plan, init_key)

  state_shapes = jax.eval_shape(init_state, ref.params)
  rules = lm_common.sharding_rules(config)
  state_shardings = parallel.param_shardings(state_shapes, mesh, rules)
  state = jax.jit(init_state, out_shardings=state_shardings)(ref.params)
  lora_base = ref.params if finetune.mode == "lora" else {}
  policy_params = jax.jit(finetune.params)
  objective, options = OBJECTIVES[config.loss], config[config.loss]

  def update(state, lora_base, batch):
    def loss_fn(trainable):
      params = finetune.params(trainable, lora_base)
      lp = {
          side: scoring.score(graphdef, params, *batch[side]).sums
          for side in ("chosen", "rejected")
      }
      return objective(lp, batch, options)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(grads, optimizer)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

  update_fn = jax.jit(finite.guard(update, config.finite.policy), donate_argnums=0)
  eval_cfg = lm_common.sampling_config(config.sampling, temperature=config.eval.temperature)
  if len(eval_set) < config.eval.num_prompts:
    raise configs.ConfigError(
        f"config.eval.num_prompts={config.eval.num_prompts}: only {len(eval_set)} held-out "
        "prompts"
    )
  eval_batch = eval_set.batch(np.arange(config.eval.num_prompts))
  eval_tokens, eval_valid = eval_batch["tokens"], eval_batch["valid"]

  def sample(params, key):
    return rollout_lib.rollout(
        graphdef,
        params,
        eval_tokens,
        eval_valid,
        key,
        eval_cfg,
        max_prompt_len=width,
        min_bucket=width,
        mesh=mesh,
    )

  reference_eval = sample(ref.params, jax.random.fold_in(eval_key, 1))

  def evaluate(trainable) -> dict:
    policy = sample(policy_params(trainable, lora_base), eval_key)
    return lm_common.evaluate(policy, reference_eval, judge)

  def minibatch() -> dict:
    """The next global batch of pairs (seeded epochs, `alignjax.data.BatchIterator` eq. 1),
    its rows sharded over the mesh's data axes."""
    return jax.tree.map(lambda x: lm_common.global_rows(x, mesh), next(batches))

  # ---------------------------------------------------------------- restore or start
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      save_every=config.checkpoint.every,
      keep=config.checkpoint.keep,
      metadata=checkpoint.run_metadata("experiments.lm_offline", config, base_model=ref.metadata),
      on_damage=config.checkpoint.on_damage,
  )
  host = {"step": 0, "base": None, "history": [], "eval_history": [], "data": batches.state()}
  if ckpt.latest_step() is not None:
    state, host = ckpt.restore(state)
    batches.restore(host["data"])  # the data position: the next pairs are the unseen ones
    logging.info("Resumed from step %d in %s", host["step"], workdir)
  ckpt.install_preemption_handler()
  writer = metrics.MetricWriter(workdir)
  monitor = finite.Monitor.from_config(config.finite, host, unit="step", last_good=ckpt.last_good)
  if host["base"] is None:
    host["base"] = evaluate(state.params)
    host["base"]["num_pairs"] = num_pairs
    host["eval_history"].append([0, host["base"]["win_rate"], host["base"].get("reward", np.nan)])
    writer.write_scalars(0, {f"eval/{k}": v for k, v in host["base"].items()})

  # ---------------------------------------------------------------- the loop
  for step in metrics.progress(
      range(host["step"], config.num_steps),
      total=config.num_steps - host["step"],
      desc=f"{config.loss} steps",
  ):
    t0 = time.perf_counter()
    state, out, nonfinite = update_fn(state, lora_base, minibatch())
    common.check_finite(monitor, step + 1, nonfinite, ckpt, writer)
    scalars = {k: float(v) for k, v in jax.device_get(out).items()}
    scalars["seconds_step"] = time.perf_counter() - t0
    scalars["finite/skipped_updates"] = monitor.skipped
    writer.write_scalars(step + 1, scalars)
    host["history"].append([step + 1, scalars["loss"]])
    if (step + 1) % config.eval.every == 0 or step + 1 == config.num_steps:
      result = evaluate(state.params)
      host["eval_history"].append([step + 1, result["win_rate"], result.get("reward", np.nan)])
      writer.write_scalars(step + 1, {f"eval/{k}": v for k, v in result.items()})
      logging.info("step %d: %s", step + 1, result)
    host.update(step=step + 1, finite=monitor.state_dict(), data=batches.state())
    ckpt.maybe_save(step + 1, state, host, force=step + 1 == config.num_steps)
    if ckpt.preemption_requested:
      logging.warning("Preemption requested: checkpoint saved at step %d, exiting.", step + 1)
      ckpt.wait_until_finished()
      writer.close()
      return {"preempted": True, "step": step + 1}

  # ---------------------------------------------------------------- final evaluation
  final = evaluate(state.params)
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
      "num_pairs": num_pairs,
      "preempted": False,
  }


def write_summary(workdir: str, host: dict, final: dict, config) -> str:
  """Prints and saves the reference vs fine-tuned table and the win-rate curve."""
  name = {"dpo": "DPO", "rpo": "RPO", "ipo": "IPO", "sppo": "SPPO"}[config.loss]
  if config.loss == "dpo" and config.dpo.label_smoothing > 0:
    name = "cDPO"
  name += f", {config.finetune.mode}, {config.num_steps} steps"
  notes = [f"{host['base']['num_pairs']} decisive pairs from {config.data.num_prompts} prompts."]
  fields = {"loss": config.loss, "final": final, "steps": config.num_steps}
  return lm_common.write_summary(
      workdir, name, host, {name: final}, config, unit="step", notes=notes, fields=fields
  )


if __name__ == "__main__":
  common.run_experiment_cli(run)
