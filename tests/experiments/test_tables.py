"""experiments/tables: the tilt-error table's error measures, the reward-vs-queries table's
budget and statistics, and a smoke run of each."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import toy
from experiments.tables import reward_vs_queries as rq
from experiments.tables import tilt_error as te


def test_gaussian_errors_are_zero_at_the_target_and_100_percent_at_the_base():
  rng = np.random.default_rng(0)
  g = te.GAUSS
  target = toy.tilted_gaussian(g["mean"], g["std"], g["c"], g["lam"])
  at_target = target + g["std"] * rng.normal(size=(200_000, 2))
  mean_err, cov_err = te.gaussian_errors(at_target)
  assert mean_err < 0.01 and cov_err < 0.01
  # the base law: mean error exactly ‖μ − μ*‖/‖μ* − μ‖ = 1 up to sampling noise
  at_base = g["mean"] + g["std"] * rng.normal(size=(200_000, 2))
  assert te.gaussian_errors(at_base)[0] == pytest.approx(1.0, abs=0.01)
  # a hand-made case: shift halfway and scale the covariance by 1.21 (error 21 %)
  half = (g["mean"] + target) / 2 + 1.1 * g["std"] * rng.normal(size=(200_000, 2))
  mean_err, cov_err = te.gaussian_errors(half)
  assert mean_err == pytest.approx(0.5, abs=0.01) and cov_err == pytest.approx(0.21, abs=0.01)


def test_mixture_weight_recovers_the_weight_of_samples_drawn_from_the_tilted_components():
  m = te.MIXTURE
  rng = np.random.default_rng(1)
  for w2 in (te.target_mode_weight(), 0.5, 0.2, 0.97):
    tw, tm = toy.tilted_mixture(m["weights"], m["means"], m["stds"], m["c"], m["lam"])
    comp = rng.random(100_000) < w2
    x = tm[comp.astype(int)] + m["stds"][0] * rng.normal(size=(100_000, 2))
    assert te.mixture_weight(x) == pytest.approx(w2, abs=0.01)
  assert te.target_mode_weight() == pytest.approx(0.731, abs=1e-3)
  # at the target law the MLE is the mean responsibility under the tilted mixture
  x = tm[(rng.random(50_000) < tw[1]).astype(int)] + 0.5 * rng.normal(size=(50_000, 2))
  _, log_post = toy.mixture_log_density(
      tw, tm, m["stds"], jnp.asarray(x, jnp.float32), jnp.ones(50_000)
  )
  assert te.mixture_weight(x) == pytest.approx(float(np.exp(log_post[:, 1]).mean()), abs=0.01)


def exact_conditional_variance(sigma, num_steps):
  """Var(X_1 | X_0) of the linear Euler–Maruyama chain of the Gaussian base, by recursion:
  X_{k+1} = (1 + h ∂b/∂x) X_k + const + σ_k √h ε, with v = μ + g (x − tμ),
  g = (t s² − (1 − t)) / ((1 − t)² + t² s²) and b = v + σ²/2 · (t v − x)/(1 − t)."""
  s2, h, var = te.GAUSS["std"] ** 2, 1.0 / num_steps, 0.0
  for k in range(num_steps):
    t = k * h
    sig2 = 2 * (1 - t + h) / (t + h) if sigma is None else sigma**2
    g = (t * s2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s2)
    slope = g + sig2 / 2 * (t * g - 1) / (1 - t)
    var = (1 + h * slope) ** 2 * var + sig2 * h
  return var


@pytest.mark.parametrize("sigma", [None, 0.5, 1.0])
def test_predicted_bias_matches_the_exact_conditional_variance(sigma):
  budget = te.Budget(num_steps=20, num_samples=100_000)
  want = abs(te.GAUSS["std"] ** 2 - exact_conditional_variance(sigma, 20)) / te.GAUSS["std"] ** 2
  assert te.predicted_mean_error(sigma, budget) == pytest.approx(want, abs=0.01)


def test_zero_sigma_is_reported_as_unsupported_not_faked():
  assert "σ" in te.unsupported_reason(0.0, te.SMOKE)
  assert te.unsupported_reason(0.5, te.SMOKE) is None


def test_smoke_run_writes_the_table_json_and_plot(tmp_path):
  out = te.run(str(tmp_path), seeds=2, budget=te.SMOKE, schedules=("memoryless", "σ=0 (ODE)"))
  table = (tmp_path / "tilt_error.md").read_text()
  assert table.strip() == out["table"].strip()
  assert "| memoryless | " in table and "| σ=0 (ODE) | n/a |" in table
  assert "not supported" in table
  data = json.loads((tmp_path / "tilt_error.json").read_text())
  row = data["results"]["memoryless"]
  assert len(row["mean_error"]) == 2 and all(np.isfinite(row["mean_error"]))
  assert 0.0 <= min(row["mode_weight"]) and max(row["mode_weight"]) <= 1.0
  assert (tmp_path / "tilt_error.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="unknown schedule"):
    te.run(str(tmp_path), schedules=("linear",))


# ============================================================================ reward vs queries


def test_every_method_spends_the_same_budget_with_its_configs_hyperparameters():
  budget = rq.Budget()
  per_update = {}
  for key, method in rq.METHODS.items():
    config = rq.method_config(method, budget, seed=2)
    per_update[key] = rq.queries_per_update(method, config)
    updates = {
        "ddpo": config.get("num_rounds"),
        "draft": config.get("num_updates"),
        "adjoint_matching": config.get("num_iterations"),
    }[method.script]
    assert updates * per_update[key] == budget.queries
    assert config.seed == 2 and config.eval.num_samples == budget.eval_samples
    assert config.model.init == "pretrained" and config.reward.name == "classifier"
    assert config.checkpoint.every > updates and config.log.image_every > updates
  assert per_update == {
      "ddpo": 128,
      "draft_1": 32,
      "draft_k": 32,
      "draft_lv": 64,
      "draft": 32,
      "am": 32,
  }
  with pytest.raises(ValueError, match="not a multiple"):
    rq.method_config(rq.METHODS["ddpo"], rq.Budget(queries=100), seed=0)


def test_reward_at_takes_the_batch_that_brings_the_total_to_the_count():
  queries, rewards = [32, 64, 96, 128], [-1.0, -0.8, -0.5, -0.2]
  assert rq.reward_at(queries, rewards, 64) == -0.8
  assert rq.reward_at(queries, rewards, 100) == -0.5
  assert rq.reward_at(queries, rewards, 16) is None


def _markdown_rows(table: str) -> list[dict]:
  lines = [line for line in table.splitlines() if line.startswith("|")]
  cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
  header = cells(lines[0])
  assert set(lines[1]) <= {"|", "-"}
  return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


def _mean_pm_std(values, digits=3) -> str:
  if None in values:
    return "n/a"
  v = np.asarray(values, np.float64)
  std = np.std(v, ddof=1) if v.size > 1 else 0.0  # one seed: the table writes "± 0"
  return f"{np.mean(v):.{digits}f} ± {std:.{digits}f}"


def _assert_rows_hold_the_results(table: str, results: dict, checkpoints, fractions) -> dict:
  """Every number of the markdown table recomputed from the per-seed results."""
  rows = {row["method"]: row for row in _markdown_rows(table)}
  assert list(rows) == [result["label"] for result in results.values()]
  for result in results.values():
    row, runs = rows[result["label"]], result["runs"]
    column = lambda name: [r[name] for r in runs]
    assert row["sampler"] == result["sampler"]
    assert row["updates × queries"] == f"{result['updates']} × {result['queries_per_update']}"
    assert row["base reward"] == _mean_pm_std(column("base_reward"))
    assert row["final reward"] == _mean_pm_std(column("final_reward"))
    gains = np.asarray(column("final_reward")) - np.asarray(column("base_reward"))
    assert row["gain (final − base, paired)"] == _mean_pm_std(list(gains))
    assert row["base diversity"] == _mean_pm_std(column("base_diversity"))
    assert row["final diversity"] == _mean_pm_std(column("final_diversity"))
    for i, (q, fraction) in enumerate(zip(checkpoints, fractions)):
      at_q = [
          float(np.asarray(r["batch_reward"])[np.asarray(r["queries"]) <= q][-1])
          if r["queries"][0] <= q
          else None
          for r in runs
      ]
      assert at_q == [r["reward_at_checkpoints"][i] for r in runs]
      assert row[f"batch reward at {q} queries ({100 * fraction:g} %)"] == _mean_pm_std(at_q)
    assert row["wall s, seed 0"] == f"{runs[0]['seconds']:.0f}"
    later = [r["seconds"] for r in runs[1:]]
    assert row["wall s, later seeds"] == (_mean_pm_std(later, 0) if later else "n/a")
  return rows


def _synthetic_results(rng, seeds: int) -> dict:
  """Per-seed records shaped like reward_vs_queries.run's, for every method."""
  results = {}
  for key, method in rq.METHODS.items():
    runs = []
    for seed in range(seeds):
      queries, batch = [32, 64, 96, 128], [float(x) for x in rng.normal(-0.3, 0.2, 4)]
      runs.append(
          {
              "seed": seed,
              "base_reward": float(rng.normal(-0.3, 0.1)),
              "final_reward": float(rng.normal(-0.2, 0.1)),
              "base_diversity": float(rng.normal(1.9, 0.02)),
              "final_diversity": float(rng.normal(1.8, 0.05)),
              "queries": queries,
              "batch_reward": batch,
              "reward_at_checkpoints": [rq.reward_at(queries, batch, q) for q in (16, 64, 128)],
              "seconds": float(rng.uniform(20, 90)),
              "compile_cache": {"hits": 4, "misses": 0, "saved_seconds": 50.0},
          }
      )
    results[key] = {
        "label": method.name,
        "sampler": "DDIM η=0, 10 steps (deterministic)",
        "queries_per_update": 32,
        "updates": 4,
        "learning_rate": 5e-5,
        "runs": runs,
    }
  return results


def test_reward_vs_queries_table_holds_mean_and_std_over_seeds(tmp_path):
  results = _synthetic_results(np.random.default_rng(0), seeds=3)
  for run, value in zip(results["ddpo"]["runs"], (-0.1, -0.2, -0.3)):
    run["base_reward"] = value
  budget = rq.Budget(queries=128, fractions=(0.125, 0.5, 1.0))
  table = rq.format_table(results, 3, budget, [16, 64, 128], seconds=12.0)
  rows = _assert_rows_hold_the_results(table, results, [16, 64, 128], budget.fractions)
  assert rows["DDPO"]["base reward"] == "-0.200 ± 0.100"  # by hand: ddof = 1
  assert all(row["batch reward at 16 queries (12.5 %)"] == "n/a" for row in rows.values())
  assert rq.plot(str(tmp_path / "curves.png"), results, budget)
  assert (tmp_path / "curves.png").stat().st_size > 1000


def test_outcome_reads_each_scripts_result_layout():
  history = [[1, -0.5], [2, -0.4]]
  results = {
      "ddpo": {
          "base_reward": -0.3,
          "final_reward": -0.2,
          "base_diversity": 1.9,
          "final_diversity": 1.8,
          "history": history,
      },
      "draft": {
          "base": {"reward_mean": -0.3, "reward_std": 0.1, "diversity": 1.9},
          "final": {"reward_mean": -0.2, "reward_std": 0.1, "diversity": 1.8},
          "history": [row + [1.7] for row in history],
          "preempted": False,
      },
      "adjoint_matching": {
          "base": {"reward": -0.3, "recognition": 0.9, "diversity": 1.9},
          "final": {"reward": -0.2, "recognition": 0.95, "diversity": 1.8},
          "history": history,
      },
  }
  for script, result in results.items():
    assert rq.outcome(script, result) == {
        "base_reward": -0.3,
        "base_diversity": 1.9,
        "final_reward": -0.2,
        "final_diversity": 1.8,
        "updates": [1, 2],
        "batch_reward": [-0.5, -0.4],
    }, script
  with pytest.raises(RuntimeError, match="preempted"):
    rq.outcome("draft", {"preempted": True, "step": 1})


@pytest.mark.slow
def test_reward_vs_queries_smoke_run_writes_a_table_equal_to_its_json(tmp_path):
  # Two tiny random models, one seed: a tiny trainer compiles for 20-45 s on this CPU (the
  # DRaFT variants share their sampler); the statistics over seeds are checked above, and
  # the DDPO and Adjoint Matching result layouts by test_outcome_reads_each_scripts_....
  out = rq.run(str(tmp_path), seeds=1, budget=rq.SMOKE, methods=("draft_1", "draft_lv"), tiny=True)
  table = (tmp_path / "reward_vs_queries.md").read_text()
  assert table.strip() == out["table"].strip()
  data = json.loads((tmp_path / "reward_vs_queries.json").read_text())
  assert (tmp_path / "reward_vs_queries.png").stat().st_size > 1000
  checkpoints = data["checkpoint_queries"]
  assert checkpoints == [8, 16, 32]
  rows = _assert_rows_hold_the_results(
      table, data["results"], checkpoints, data["budget"]["fractions"]
  )
  assert list(rows) == ["DRaFT-1", "DRaFT-LV (n=2)"]
  for key in ("draft_1", "draft_lv"):
    result = data["results"][key]
    per_update = result["queries_per_update"]
    for r in result["runs"]:  # the history covers exactly the budget
      assert r["queries"] == [per_update * (i + 1) for i in range(len(r["queries"]))]
      assert r["queries"][-1] == rq.SMOKE.queries
      for name in ("base_reward", "final_reward", "base_diversity", "final_diversity"):
        assert np.isfinite(r[name]), name
  assert data["results"]["draft_lv"]["queries_per_update"] == 32  # n = 2 copies of 16
  assert rows["DRaFT-LV (n=2)"]["batch reward at 16 queries (50 %)"] == "n/a"  # no update yet
  assert all("DDIM η=0" in row["sampler"] for row in rows.values())
  with pytest.raises(ValueError, match="unknown method"):
    rq.run(str(tmp_path), methods=("ppo",))


def test_check_rows_names_bad_seeds_and_unknown_rows():
  from experiments import tables  # pylint: disable=import-outside-toplevel

  assert tables.check_rows("method", None, {"a": 1, "b": 2}, seeds=1) == ("a", "b")
  assert tables.check_rows("method", ["b"], {"a": 1, "b": 2}, seeds=3) == ("b",)
  with pytest.raises(ValueError, match=r"seeds=0: must be >= 1"):
    tables.check_rows("method", None, {"a": 1}, seeds=0)
  with pytest.raises(ValueError, match=r"unknown schedule 'c': valid choices are \['a', 'b'\]"):
    tables.check_rows("schedule", ["a", "c"], {"a": 1, "b": 2}, seeds=1)
