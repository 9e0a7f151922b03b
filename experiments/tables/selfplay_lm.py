r"""Self-play at LM scale: each method's win rate against the reference and against each other.

  python -m experiments.tables.selfplay_lm --workdir=runs/selfplay_lm

On the embedded arithmetic LM with the intransitive judge of three rater populations
(alignjax.data.synthetic_language eq. 5: majorities of the raters cycle, so no reward model
expresses the judge), the reference is fine-tuned by experiments/lm_online.py with each
preference-based method — online IPO, Nash-MD (mixture opponent), Nash-EMA (EMA opponent) and
SPO (last and average iterate) — from the same config (lm_online/arithmetic.py:judge=raters,
`--iterations` iterations each), and beside them the reward-based baselines RLHF and DPO
(`baselines`). Then one response per policy is drawn for each of
`--num_prompts` held-out prompts (fixed keys) and every pair of policies is judged on the same
prompts:

  (1)  W[i, j] = (1/N) Σ_n P(y_i,n ≻ y_j,n | x_n)     (the judge's win probability, ties ½),
  (2)  95 % interval  W[i, j] ± 1.96 · s_ij / √N,  s_ij the standard deviation of the N
       per-prompt judgements.

Writes <workdir>/selfplay_lm.md (also printed) and selfplay_lm.json; each method's run lives
in <workdir>/<method>/.

Measured (2-core CPU, 2026-12-04, 272 s, 300 iterations each, DPO 1000 steps, 1024 held-out
prompts): P(row ≻ column)

              reference  onl.IPO  Nash-MD  Nash-EMA   SPO   SPO(avg)  RLHF    DPO
  online IPO    0.535       —      0.400    0.409    0.356   0.362   0.407   0.433
  Nash-MD       0.622     0.600      —      0.509    0.431   0.442   0.548   0.556
  Nash-EMA      0.610     0.591    0.491      —      0.430   0.440   0.541   0.547
  SPO           0.656     0.644    0.569    0.570      —     0.514   0.651   0.634
  SPO (avg)     0.651     0.638    0.558    0.560    0.486     —     0.637   0.624
  RLHF          0.608     0.593    0.452    0.459    0.349   0.363     —     0.574
  DPO           0.596     0.567    0.444    0.453    0.366   0.376   0.426     —

(95 % intervals ±0.005-0.015.) Every policy beats the reference. The reward-based baselines
(RLHF: a Bradley–Terry reward model of the raters' judgements, then GRPO on it; DPO on
rater-judged pairs) beat it too, but lose to Nash-MD (0.548, 0.556) and SPO (0.651, 0.634):
on a judge whose majorities cycle, optimising a scalar reward falls short of the self-play
methods, as both papers claim. SPO's win rates over its group are the strongest signal on this
judge, and its average iterate is within 0.01 of its last one.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

import jax
import numpy as np

from alignjax import parallel, scripts
from alignjax.lm import rollout as rollout_lib

scripts.make_importable(__file__, __package__)

from experiments import lm_common, lm_offline, lm_online, reward_model
from experiments.configs.lm_offline import arithmetic as offline_arithmetic
from experiments.configs.lm_online import arithmetic
from experiments.configs.reward_model import arithmetic as reward_model_arithmetic

METHODS = {  # name: config argument of lm_online/arithmetic.py
    "online IPO": "algorithm=online_ipo,judge=raters",
    "Nash-MD": "algorithm=nash_md,judge=raters",
    "Nash-EMA": "algorithm=nash_ema,judge=raters",
    "SPO": "algorithm=spo,judge=raters",
}

# The reward-based baselines on the same judge: RLHF (a Bradley–Terry reward model of the raters'
# judgements, experiments/reward_model.py, then GRPO on it) and offline DPO on the reference's
# rater-judged pairs (experiments/lm_offline.py, the best against the worst of 8 samples).
BASELINES = ("RLHF (BT + GRPO)", "DPO")

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (runs, table).")
_ITERATIONS = flags.DEFINE_integer("iterations", 300, "lm_online iterations per method.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 1024, "Held-out prompts judged per pair.")
_REFERENCE = flags.DEFINE_string(
    "reference_dir", "", "An HF LM directory as the reference ('' = the embedded LM)."
)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny runs (tests): 2 iterations, 16 prompts.")


def method_config(arg: str, iterations: int, reference_dir: str, smoke: bool):
  config = arithmetic.get_config(arg + (",smoke=True" if smoke else ""))
  config.num_iterations = iterations
  config.eval.every = iterations
  config.checkpoint.every = iterations
  if reference_dir:
    config.reference.model_dir = reference_dir
  return config


def pairwise(policies: dict, graphdef, batch, config, judge, mesh) -> dict:
  """Eqs. 1-2 for every ordered pair of `policies` ({name: params}) on the prompt `batch`."""
  cfg = lm_common.sampling_config(config.sampling, temperature=config.eval.temperature)
  width = batch["tokens"].shape[1]
  samples = {}
  for i, (name, params) in enumerate(policies.items()):
    r = rollout_lib.rollout(
        graphdef,
        params,
        batch["tokens"],
        batch["valid"],
        jax.random.fold_in(jax.random.key(12345), i),
        cfg,
        max_prompt_len=width,
        min_bucket=width,
        mesh=mesh,
    )
    samples[name] = lm_common.completions(r)
  table = {}
  for a in policies:
    for b in policies:
      if a == b:
        continue
      p = np.asarray(judge.win_probability(samples[a], samples[b]), np.float64)
      table[f"{a} vs {b}"] = {
          "win_rate": float(p.mean()),
          "ci95": float(1.96 * p.std() / np.sqrt(len(p))),
      }
  return table


def baselines(workdir: str, iterations: int, reference_dir: str, smoke: bool, devices) -> dict:
  """The BASELINES' runs ({name: the script's result}): RLHF trains a Bradley–Terry reward model
  on pairs of reference samples labelled by the raters, then `iterations` of GRPO on its
  rewards (evaluated by the raters); DPO runs lm_offline's default (loss=dpo) with the raters
  as the judge of its pairs."""
  rm_config = reward_model_arithmetic.get_config("smoke=True" if smoke else None)
  rm_config.judge.name = "raters"
  offline = offline_arithmetic.get_config("loss=dpo" + (",smoke=True" if smoke else ""))
  offline.judge.name = "raters"
  offline.data.min_reward_gap = 0.0  # the raters give preferences, not rewards
  if reference_dir:
    rm_config.reference.model_dir = offline.reference.model_dir = reference_dir
  rm_dir = os.path.join(workdir, "RLHF_reward_model")
  reward_model.run(rm_config, rm_dir)
  rlhf = method_config("algorithm=grpo", iterations, reference_dir, smoke)
  rlhf.judge.update(name="reward_model", model_dir=os.path.join(rm_dir, "reward_model"))
  rlhf.eval.judge.name = "raters"
  return {
      BASELINES[0]: lm_online.run(rlhf, os.path.join(workdir, "RLHF"), devices=devices),
      BASELINES[1]: lm_offline.run(offline, os.path.join(workdir, "DPO"), devices=devices),
  }


def run(
    workdir: str,
    *,
    iterations: int = 300,
    num_prompts: int = 1024,
    reference_dir: str = "",
    smoke: bool = False,
    devices=None,
) -> dict:
  """Trains every method, judges every pair of policies (eqs. 1-2); returns the table's data
  (also written to <workdir>/selfplay_lm.json, the markdown to selfplay_lm.md)."""
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  policies, runs, config = {}, {}, None
  for name, arg in METHODS.items():
    config = method_config(arg, iterations, reference_dir, smoke)
    out = lm_online.run(config, os.path.join(workdir, name.replace(" ", "_")), devices=devices)
    runs[name] = {"final": out["final"], "base": out["base"]}
    policies[name] = out["params"]
    if "average" in out:
      policies[name + " (average)"] = out["average"]
  for name, out in baselines(workdir, iterations, reference_dir, smoke, devices).items():
    runs[name] = {"final": out["final"], "base": out["base"]}
    policies[name] = out["params"]
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  ref = lm_common.load_reference(config, mesh)
  policies = {"reference": ref.params, **policies}
  batch = lm_common.eval_prompt_set(config).batch(np.arange(num_prompts))
  judge = lm_common.make_judge(config.judge)
  table = pairwise(policies, ref.graphdef, batch, config, judge, mesh)

  names = list(policies)
  lines = [
      "| P(row ≻ column), ±95 % | " + " | ".join(names) + " |",
      "|" + "---|" * (len(names) + 1),
  ]
  for a in names:
    cells = []
    for b in names:
      cell = table.get(f"{a} vs {b}")
      cells.append("—" if cell is None else f"{cell['win_rate']:.3f} ± {cell['ci95']:.3f}")
    lines.append(f"| {a} | " + " | ".join(cells) + " |")
  lines += [
      "",
      f"{num_prompts} held-out prompts, one sample per policy (T={config.eval.temperature}), "
      f"{iterations} iterations per method, judge: three rater populations (cyclic).",
  ]
  text = "\n".join(lines)
  print(text, flush=True)
  with open(os.path.join(workdir, "selfplay_lm.md"), "w") as f:
    f.write(text + "\n")
  result = {
      "pairs": table,
      "runs": runs,
      "iterations": iterations,
      "num_prompts": num_prompts,
      "seconds": time.time() - t0,
      "table": text,
  }
  with open(os.path.join(workdir, "selfplay_lm.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def main(argv) -> None:
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (the runs and the table go there)")
  run(
      _WORKDIR.value,
      iterations=2 if _SMOKE.value else _ITERATIONS.value,
      num_prompts=16 if _SMOKE.value else _NUM_PROMPTS.value,
      reference_dir=_REFERENCE.value,
      smoke=_SMOKE.value,
  )


if __name__ == "__main__":
  app.run(main)
