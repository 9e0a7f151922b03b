r"""Reward against reward queries: DDPO, DRaFT-1, DRaFT-K, DRaFT-LV, DRaFT, Adjoint Matching.

  python -m experiments.tables.reward_vs_queries --workdir=runs/tables

Reproduces, at toy scale, the sample-efficiency claim of DRaFT (Clark et al. 2024):
fine-tuning by backpropagating a differentiable reward through the sampler reaches a higher
reward per reward query than policy-gradient fine-tuning (DDPO, Black et al. 2024); Adjoint
Matching (Domingo-Enrich et al. 2024), which also uses the reward's gradient, is compared on
the same footing. Set-up: the embedded digits diffusion model (experiments/
pretrain_diffusion.py, cached), the differentiable reward r(x, c) = log p_classifier(c | x)
for the prompt digit c, every method trained by its own experiment script (`run`) on the
same budget of Q = 256 reward queries, 3 seeds.

Measured (2-core CPU shared with other jobs, so times are inflated by a varying
amount; pretrained model cached, empty compilation cache): 16 min 7 s for the command (the
table's own clock: 960 s; the first seed of each method 46-127 s, later seeds 18-48 s). The
held-out reward gain (eq. 2) after 256 queries, mean ± std over 3 seeds, and the
within-class diversity base → final:

  DRaFT (full)       +0.221 ± 0.085    1.896 → 1.739
  DRaFT-K (K = 5)    +0.221 ± 0.087    1.896 → 1.741
  Adjoint Matching   +0.098 ± 0.064    1.739 → 1.649
  DRaFT-1            +0.031 ± 0.015    1.896 → 1.886
  DRaFT-LV (n = 2)   +0.014 ± 0.009    1.896 → 1.888
  DDPO (2 rounds)    −0.002 ± 0.015    1.578 → 1.560

Reward backpropagation through ≥ 5 sampling steps, and Adjoint Matching, raise the reward
within 256 queries while DDPO does not move (its own config spends ~4,600 queries for
+0.05): the claim holds for those. DRaFT-1 and DRaFT-LV, the paper's most query-efficient
variants, gain little after 8 and 4 updates at the config's learning rate — not reproduced
at this budget. The diversity drops by ~0.15 (DRaFT-K, DRaFT) and ~0.09 (Adjoint Matching)
with the gain: a price, not a collapse. The batch-reward columns are single training
batches of a heavy-tailed reward (one misdrawn digit moves a 32-image mean by 0.1-0.3) and
do not track the held-out gains (Adjoint Matching's even fall while its held-out reward
rises on every seed); read the paired gain.

Why only 256 queries: on this CPU the 18 runs carry ~10 minutes of fixed cost — compiling
the six trainers (~1 min each, first seed only) and, per run, model loading (~8 s), tracing,
the two held-out evaluations and the final checkpoint (15-30 s) — and each further 128
queries (one DDPO round) cost ~3 min over the three seeds of all methods, so a budget of 384
would not fit in 20 minutes with any margin.

Budget accounting. A reward query is one evaluation of the reward on one image; every method
gets the same budget Q of training queries (default 256), spent in updates of

  (1)  q = B · b            DDPO: B = 32 sampled images per batch, b = 4 batches per round;
       q = B · max(1, n)    DRaFT-1, -K, full: B = 32 (n = 0); DRaFT-LV: n = 2 re-noisings
                            of each of the B samples, each scored (experiments/draft.py);
       q = B                Adjoint Matching: the reward gradient at the B final samples;

queries, so U = Q / q updates (Q a multiple of every q: DDPO 2 rounds, DRaFT-1/-K/full and
Adjoint Matching 8 updates, DRaFT-LV 4). The gradient of a differentiable reward comes with
its value and is not counted separately; Adjoint Matching's logged batch reward re-scores
the same images and is not counted either. Evaluation queries (the held-out samples) are
not part of the budget.

Curve and columns. The reward after Q' ≤ Q queries is the mean reward of the training batch
whose queries bring the total to Q' (the on-policy batch: sampled by the model after the
updates before it; for DRaFT-LV the n·B re-denoised images, for the others the batch's
samples); the table reports it at 25 %, 50 % and 100 % of Q. "Base" and "final" are the
held-out evaluations the experiment scripts run before and after training: the mean reward
and the within-class diversity (alignjax.metrics eq. 2, the mean pairwise L2 distance
between images in [0, 1] of one digit, averaged over digits) of E held-out samples (default
128, every digit in turn), drawn with each method's own sampler:

  DDPO                  DDIM with eta = 1 (DDPM), 10 steps, stochastic;
  Adjoint Matching      DDIM with eta = 1 (DDPM), 20 steps, stochastic (memoryless);
  DRaFT (all variants)  DDIM with eta = 0, 10 steps, deterministic (the chain DRaFT
                        differentiates).

The base reward therefore differs between the samplers; compare each method's gain over
its own base,

  (2)  gain = R_final − R_base,

computed per seed and then averaged: both evaluations of one seed use the same held-out keys
(same initial noise and prompts), so the evaluation noise that spreads the base reward over
seeds largely cancels in the pair. A falling diversity at a rising reward is reward hacking
(collapse of each digit onto a few images).

Seeds. Each method runs with config.seed = 0, 1, 2 (the training keys and the held-out
evaluation keys; the base model is the same cached pretrained UNet); the table reports
mean ± std over seeds (std with ddof = 1).

Hyperparameters are those of experiments/configs/{ddpo,draft,adjoint_matching}/digits.py
except: the number of updates (U of eq. 1, instead of the configs' 36 DDPO rounds and 40
DRaFT / Adjoint Matching updates), eval.num_samples = E (instead of 512/320/256), and
checkpoint.every = log.image_every = U + 1 (only the final, forced checkpoint; no training
image grids). Compilation is shared by the seeds through JAX's
persistent compilation cache in <workdir>/jax_cache (the JSON records its hits per run).

Writes <workdir>/reward_vs_queries.md (also printed), reward_vs_queries.json (every per-seed
number) and reward_vs_queries.png (reward vs queries, mean ± std band over seeds; held-out
reward vs diversity); each run's own outputs are under <workdir>/runs/<method>/seed<k>.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

from absl import app, flags

import jax
import numpy as np

from alignjax import scripts

scripts.make_importable(__file__, __package__)

from experiments import adjoint_matching as am_script
from experiments import common, tables
from experiments import ddpo as ddpo_script
from experiments import draft as draft_script
from experiments.configs.adjoint_matching import digits as am_configs
from experiments.configs.ddpo import digits as ddpo_configs
from experiments.configs.draft import digits as draft_configs


@dataclasses.dataclass(frozen=True)
class Budget:
  """Reward queries per run (Q of eq. 1), held-out samples (E) and the reported fractions."""

  queries: int = 256
  eval_samples: int = 128
  fractions: tuple[float, ...] = (0.25, 0.5, 1.0)


# Tiny random models (the configs' tiny=True): 16 queries per DDPO round and DRaFT update,
# 32 per DRaFT-LV update, 8 per Adjoint Matching iteration.
SMOKE = Budget(queries=32, eval_samples=16)


@dataclasses.dataclass(frozen=True)
class Method:
  name: str  # the table's row (K and n are appended from the config)
  script: str  # "ddpo" | "draft" | "adjoint_matching"
  config_arg: str  # argument of experiments/configs/<script>/digits.py get_config


METHODS = {
    "ddpo": Method("DDPO", "ddpo", "variant=is,reward=classifier"),
    "draft_1": Method("DRaFT-1", "draft", "variant=1"),
    "draft_k": Method("DRaFT-K", "draft", "variant=k"),
    "draft_lv": Method("DRaFT-LV", "draft", "variant=lv"),
    "draft": Method("DRaFT", "draft", "variant=full"),
    "am": Method("Adjoint Matching", "adjoint_matching", "model=eps"),
}

_SCRIPTS = {
    "ddpo": (ddpo_script, ddpo_configs, "num_rounds"),
    "draft": (draft_script, draft_configs, "num_updates"),
    "adjoint_matching": (am_script, am_configs, "num_iterations"),
}


# ============================================================================ configs


def queries_per_update(method: Method, config) -> int:
  """q of eq. 1 for this method's config."""
  batch = config.sampling.batch_size
  if method.script == "ddpo":
    return batch * config.sampling.batches_per_round
  if method.script == "draft":
    return batch * max(1, draft_script.draft_options(config)["lv_samples"])
  return batch


def method_config(method: Method, budget: Budget, seed: int, *, tiny: bool = False):
  """The method's digits config with the budget's updates, seed and evaluation size."""
  _, configs_module, updates_key = _SCRIPTS[method.script]
  config = configs_module.get_config(f"{method.config_arg},tiny={tiny}")
  per_update = queries_per_update(method, config)
  if budget.queries % per_update:
    raise ValueError(
        f"budget of {budget.queries} queries is not a multiple of the "
        f"{per_update} queries of one {method.name} update"
    )
  updates = budget.queries // per_update
  config[updates_key] = updates
  config.seed = seed
  config.eval.num_samples = budget.eval_samples
  config.checkpoint.every = updates + 1  # only the final checkpoint (always written)
  config.log.image_every = updates + 1  # no training image grids
  return config


def row_label(method: Method, config) -> str:
  if method.script == "draft" and config.draft.variant == "k":
    return f"{method.name} (K={config.draft.truncation_k})"
  if method.script == "draft" and config.draft.variant == "lv":
    return f"{method.name} (n={config.draft.lv_samples})"
  return method.name


def sampler_label(method: Method, config) -> str:
  s = config.sampling
  kind = "deterministic" if s.eta == 0 else "stochastic"
  return f"DDIM η={s.eta:g}, {s.num_steps} steps ({kind})"


# ============================================================================ one run


class CompileCacheEvents:
  """Counts the persistent compilation cache's hits and misses while active."""

  def __init__(self):
    self.hits = self.misses = 0
    self.saved_seconds = 0.0

  def _on_event(self, event: str, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
      self.hits += 1
    elif event == "/jax/compilation_cache/cache_misses":
      self.misses += 1

  def _on_duration(self, event: str, duration: float, **kwargs):
    if event == "/jax/compilation_cache/compile_time_saved_sec":
      self.saved_seconds += duration

  def __enter__(self):
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_listener(self._on_event)
    jax.monitoring.unregister_event_duration_listener(self._on_duration)

  def as_dict(self) -> dict:
    return {"hits": self.hits, "misses": self.misses, "saved_seconds": self.saved_seconds}


def outcome(script: str, result: dict) -> dict:
  """Held-out base/final reward and diversity and the (update, batch reward) history, in
  the same keys for every script (experiments/ddpo.py names them differently)."""
  if result.get("preempted"):
    raise RuntimeError("the run was preempted")
  if script == "ddpo":
    base = (result["base_reward"], result["base_diversity"])
    final = (result["final_reward"], result["final_diversity"])
  else:
    reward_key = "reward_mean" if script == "draft" else "reward"
    base = (result["base"][reward_key], result["base"]["diversity"])
    final = (result["final"][reward_key], result["final"]["diversity"])
  return {
      "base_reward": float(base[0]),
      "base_diversity": float(base[1]),
      "final_reward": float(final[0]),
      "final_diversity": float(final[1]),
      "updates": [int(row[0]) for row in result["history"]],
      "batch_reward": [float(row[1]) for row in result["history"]],
  }


def run_method(method: Method, config, workdir: str) -> dict:
  """One training run from scratch (an earlier run's checkpoints are removed)."""
  script_module, _, _ = _SCRIPTS[method.script]
  shutil.rmtree(workdir, ignore_errors=True)  # a checkpoint there would be resumed
  t0 = time.perf_counter()
  with CompileCacheEvents() as cache_events:
    result = script_module.run(config, workdir)
  record = outcome(method.script, result)
  record.update(
      seed=int(config.seed), seconds=time.perf_counter() - t0, compile_cache=cache_events.as_dict()
  )
  return record


def reward_at(queries: list[int], rewards: list[float], target: int) -> float | None:
  """The batch reward of the update that brings the total to `target` queries (the last one
  within it); None before the first update."""
  within = [r for q, r in zip(queries, rewards) if q <= target]
  return within[-1] if within else None


# ============================================================================ the table


def run(
    workdir: str,
    *,
    seeds: int = 3,
    budget: Budget = Budget(),
    methods: tuple[str, ...] | None = None,
    tiny: bool = False,
) -> dict:
  """Trains every method (default: all of METHODS) × seed on the same query budget; writes
  and returns the table. tiny=True: the configs' random tiny models (tests)."""
  methods = tables.check_rows("method", methods, METHODS, seeds)
  checkpoints = [int(round(f * budget.queries)) for f in budget.fractions]
  t0 = time.perf_counter()
  results = {}
  with common.persistent_compilation_cache(os.path.join(workdir, "jax_cache")):
    for key in methods:
      results[key] = run_seeds(key, budget, seeds, checkpoints, workdir, tiny)
      print(f"{results[key]['label']}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
  seconds = time.perf_counter() - t0
  table = format_table(results, seeds, budget, checkpoints, seconds)
  print(table, flush=True)
  with open(os.path.join(workdir, "reward_vs_queries.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "reward_vs_queries.json"), "w") as f:
    json.dump(
        {
            "results": results,
            "seeds": seeds,
            "budget": dataclasses.asdict(budget),
            "checkpoint_queries": checkpoints,
            "tiny": tiny,
            "seconds": seconds,
        },
        f,
        indent=2,
    )
  plot(os.path.join(workdir, "reward_vs_queries.png"), results, budget)
  return {"results": results, "table": table, "seconds": seconds}


def run_seeds(
    key: str, budget: Budget, seeds: int, checkpoints: list[int], workdir: str, tiny: bool
) -> dict:
  """All seeds of one method: its description and one record per seed."""
  method = METHODS[key]
  runs = []
  for seed in range(seeds):
    config = method_config(method, budget, seed, tiny=tiny)
    per_update = queries_per_update(method, config)
    record = run_method(method, config, os.path.join(workdir, "runs", key, f"seed{seed}"))
    record["queries"] = [u * per_update for u in record["updates"]]
    record["reward_at_checkpoints"] = [
        reward_at(record["queries"], record["batch_reward"], q) for q in checkpoints
    ]
    runs.append(record)
    print(
        f"{method.name} seed {seed}: {record['seconds']:.0f} s, final reward "
        f"{record['final_reward']:.3f}, compilation cache {record['compile_cache']}",
        flush=True,
    )
  return {
      "label": row_label(method, config),
      "sampler": sampler_label(method, config),
      "queries_per_update": per_update,
      "updates": budget.queries // per_update,
      "learning_rate": float(config.optimizer.learning_rate),
      "runs": runs,
  }


def mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _pm(values, digits: int = 3) -> str:
  """ "mean ± std", or "n/a" where a seed has no value (None: no update yet, or NaN)."""
  if any(v is None for v in values) or not np.all(np.isfinite(values)):
    return "n/a"
  mean, std = mean_std(values)
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _column(row: dict, name: str) -> list[float]:
  return [run[name] for run in row["runs"]]


def reward_gains(row: dict) -> list[float]:
  """Eq. 2 per seed: final − base held-out reward, both on the seed's held-out keys."""
  return [run["final_reward"] - run["base_reward"] for run in row["runs"]]


def format_table(
    results: dict, seeds: int, budget: Budget, checkpoints: list[int], seconds: float
) -> str:
  at = " | ".join(
      f"batch reward at {q} queries ({100 * f:g} %)" for q, f in zip(checkpoints, budget.fractions)
  )
  lines = [
      f"| method | sampler | updates × queries | base reward | {at} | final reward | "
      "gain (final − base, paired) | base diversity | final diversity | wall s, seed 0 | "
      "wall s, later seeds |",
      "|" + "---|" * (10 + len(checkpoints)),
  ]
  for row in results.values():
    runs = row["runs"]
    at_cells = " | ".join(
        _pm([r["reward_at_checkpoints"][i] for r in runs]) for i in range(len(checkpoints))
    )
    later = _pm([r["seconds"] for r in runs[1:]], 0) if len(runs) > 1 else "n/a"
    lines.append(
        f"| {row['label']} | {row['sampler']} | {row['updates']} × {row['queries_per_update']}"
        f" | {_pm(_column(row, 'base_reward'))} | {at_cells} | "
        f"{_pm(_column(row, 'final_reward'))} | {_pm(reward_gains(row))} | "
        f"{_pm(_column(row, 'base_diversity'))} | "
        f"{_pm(_column(row, 'final_diversity'))} | {runs[0]['seconds']:.0f} | {later} |"
    )
  hits = sum(r["compile_cache"]["hits"] for row in results.values() for r in row["runs"][1:])
  saved = sum(r["compile_cache"]["saved_seconds"] for row in results.values() for r in row["runs"])
  notes = [
      f"Mean ± std (ddof=1) over {seeds} seed(s). Every method spends {budget.queries} "
      "training reward queries (one query = the reward of one image; DRaFT-LV scores each "
      "of its n re-noised copies; eq. 1 of experiments/tables/reward_vs_queries.py).",
      "Rewards: log p_classifier(c | image) for the prompt digit c (0 is the best). Batch "
      "reward = mean reward of the on-policy training batch that brings the queries to that "
      "count (DRaFT-LV: its n·B re-denoised images). Base/final reward and diversity: "
      f"held-out evaluation, {budget.eval_samples} samples (every digit in turn) with the "
      "method's own sampler — base rewards differ between samplers, compare gains.",
      "Gain: final − base reward of each seed (eq. 2 of the module), paired — both "
      "evaluations use the seed's held-out keys, so the spread of the base reward over "
      "seeds (the evaluation noise) largely cancels.",
      "Diversity: within-class mean pairwise L2 distance of images in [0, 1] "
      "(alignjax.metrics eq. 2); a drop while the reward rises is reward hacking.",
      "Wall seconds per run include model loading, both held-out evaluations, the final "
      "checkpoint and, for seed 0, compilation (later seeds read it from the persistent "
      f"cache: {hits} hits; {saved:.0f} s of compilation saved in all).",
      f"Total wall time {seconds:.0f} s.",
  ]
  return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def plot(path: str, results: dict, budget: Budget) -> str:
  """Left: batch reward vs queries (mean ± std over seeds, band) and the held-out base and
  final rewards at 0 and Q (dashed, error bars; shifted a little per method to stay apart).
  Right: held-out reward vs diversity, base (open) → final (filled)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(13.0, 4.8), dpi=100)
  FigureCanvasAgg(fig)
  curves, scatter = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  shift = 0.01 * budget.queries
  for i, row in enumerate(results.values()):
    color, runs = f"C{i}", row["runs"]
    queries = np.asarray(runs[0]["queries"])
    rewards = np.asarray([r["batch_reward"] for r in runs], np.float64)
    mean = rewards.mean(0)
    std = rewards.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
    curves.plot(queries, mean, color=color, marker=".", label=row["label"])
    curves.fill_between(queries, mean - std, mean + std, color=color, alpha=0.1)
    base, final = mean_std(_column(row, "base_reward")), mean_std(_column(row, "final_reward"))
    x = np.array([0.0, budget.queries]) + (i - len(results) / 2) * shift
    curves.errorbar(
        x,
        [base[0], final[0]],
        yerr=[base[1], final[1]],
        color=color,
        fmt="o--",
        capsize=3,
        markersize=4,
        alpha=0.8,
    )
    div_base = mean_std(_column(row, "base_diversity"))
    div_final = mean_std(_column(row, "final_diversity"))
    scatter.plot([div_base[0], div_final[0]], [base[0], final[0]], color=color, alpha=0.5)
    scatter.errorbar(
        div_base[0],
        base[0],
        xerr=div_base[1],
        yerr=base[1],
        color=color,
        fmt="o",
        mfc="none",
        capsize=3,
    )
    scatter.errorbar(
        div_final[0],
        final[0],
        xerr=div_final[1],
        yerr=final[1],
        color=color,
        fmt="o",
        capsize=3,
        label=row["label"],
    )
  curves.set(
      xlabel="reward queries",
      ylabel="log p(c | image)",
      title="batch reward (solid, ± std); held-out base → final (dashed)",
  )
  scatter.set(
      xlabel="within-class diversity (mean pairwise L2)",
      ylabel="held-out reward",
      title="held-out reward vs diversity (open: base → filled: final)",
  )
  for ax in (curves, scatter):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, format="png")
  return path


def main(argv, workdir_flag, seeds_flag, queries_flag, eval_flag, methods_flag):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if workdir_flag.value is None:
    raise app.UsageError("--workdir is required (the table, the JSON and the plot go there)")
  budget = Budget(queries=queries_flag.value, eval_samples=eval_flag.value)
  run(
      workdir_flag.value,
      seeds=seeds_flag.value,
      budget=budget,
      methods=tuple(methods_flag.value) if methods_flag.value else None,
  )


if __name__ == "__main__":
  # Flags are defined when the script runs, not on import (tests import several tables).
  _FLAGS = (
      flags.DEFINE_string(
          "workdir", None, "Directory for reward_vs_queries.md/.json/.png and the runs."
      ),
      flags.DEFINE_integer("seeds", 3, "Seeds per method."),
      flags.DEFINE_integer("queries", Budget.queries, "Reward queries per run."),
      flags.DEFINE_integer("eval_samples", Budget.eval_samples, "Held-out samples per evaluation."),
      flags.DEFINE_list("methods", None, f"Subset of {list(METHODS)} (default: all)."),
  )
  app.run(lambda argv: main(argv, *_FLAGS))
