"""experiments/tables/selfplay.py: its games, its tabular methods against the library's losses,
and a smoke run of the script as a file (the table equals its JSON, and the claim holds)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.algorithms import games
from alignjax.algorithms import policy_gradient as pg
from experiments.tables import selfplay as sp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAU = 0.05


def test_games_are_preference_matrices_with_the_stated_winners():
  defs = sp.make_games(0)
  for name, game in defs.items():
    p = game["preference"]
    games.check_preference(p)  # raises unless 0 <= P <= 1 and P + Pᵀ = 1
    assert len(game["labels"]) == p.shape[0], name
  rps, cycle, majority, rand, transitive = (defs[k]["preference"] for k in defs)
  assert rps[0, 2] == 1.0 and rps[1, 0] == 1.0 and rps[2, 1] == 1.0
  assert (cycle[0, 1], cycle[1, 2], cycle[2, 0]) == pytest.approx((0.9, 0.6, 0.7))
  # 2 voters R > G > B, 3 voters B > R > G: B beats both 3 : 2, R beats G 5 : 0
  assert majority[2, 0] == pytest.approx(0.6) and majority[2, 1] == pytest.approx(0.6)
  assert majority[0, 1] == 1.0 and sp.condorcet_winner(majority) == 2
  assert sp.condorcet_winner(rps) is None and sp.condorcet_winner(cycle) is None
  assert sp.condorcet_winner(rand) is None and sp.condorcet_winner(transitive) == 0
  p, draws = sp.random_game(5, 0)
  np.testing.assert_array_equal(p, rand)
  assert draws >= 1 and np.allclose(np.diag(p), 0.5)


def test_online_ipo_expected_loss_is_the_librarys_loss_averaged_over_all_pairs():
  p = jnp.asarray(sp.make_games(0)["3-cycle (0.9, 0.6, 0.7)"]["preference"], jnp.float32)
  log_mu = jnp.asarray(sp.reference_logits(3), jnp.float32)
  z = jnp.array([0.3, -0.2, 0.1])
  sampling = jax.nn.softmax(jnp.array([0.5, 0.0, -0.5]))
  y, y2 = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
  y, y2 = y.ravel(), y2.ravel()
  logp = jax.nn.log_softmax(z)
  rows = jnp.stack([logp[y], logp[y2]], 1).reshape(-1, 1)  # rows (2i, 2i + 1) = (y, y')
  ref = jnp.stack([log_mu[y], log_mu[y2]], 1).reshape(-1, 1)
  ones = jnp.ones((2, 1))
  pair = lambda i: slice(2 * i, 2 * i + 2)
  per_pair = [
      pg.online_ipo_loss(rows[pair(i)], ref[pair(i)], ones, p[y[i], y2[i]][None], tau=TAU)[0]
      for i in range(9)
  ]
  want = sum(float(sampling[a] * sampling[b]) * float(l) for a, b, l in zip(y, y2, per_pair))
  got = sp.online_ipo_expected_loss(z, sampling, p, log_mu, TAU)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_methods_reach_their_fixed_points_on_the_majority_game():
  p = sp.make_games(0)["majority (2: R>G>B, 3: B>R>G)"]["preference"]
  probs = sp.solve(p, tau=TAU, budget=sp.SMOKE)
  assert set(probs) == set(sp.method_names())
  for pi in probs.values():
    assert pi.shape == (3,) and pi.sum() == pytest.approx(1.0) and (pi >= 0).all()
  nash = probs["π*_τ (regularised Nash)"]  # π ∝ μ exp(P π / τ)
  log_mu = sp.reference_logits(3)
  logits = log_mu + p @ nash / TAU
  np.testing.assert_allclose(nash, np.exp(logits) / np.exp(logits).sum(), atol=1e-4)
  np.testing.assert_allclose(probs["DPO (all pairs)"], probs["RLHF (BT reward)"], atol=1e-4)
  for name in ("online IPO", "Nash-MD (β = ητ)", "Nash-MD-PG β=0"):
    np.testing.assert_allclose(probs[name], nash, atol=2e-3, err_msg=name)
  np.testing.assert_allclose(probs["reference μ"], np.exp(log_mu), atol=1e-6)


def _markdown_rows(table: str) -> list[dict]:
  lines = [line for line in table.splitlines() if line.startswith("|")]
  cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
  header = cells(lines[0])
  assert header == list(sp.HEADER) and set(lines[1]) <= {"|", "-"}
  return [dict(zip(header, cells(line), strict=True)) for line in lines[2:]]


def test_smoke_run_as_a_file_writes_a_table_equal_to_its_json_and_the_claim_holds(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  script = os.path.join(ROOT, "experiments", "tables", "selfplay.py")
  done = subprocess.run(
      [sys.executable, script, "--smoke", f"--workdir={tmp_path}"],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=240,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  table = (tmp_path / "selfplay.md").read_text()
  assert table.strip() in done.stdout  # printed too
  data = json.loads((tmp_path / "selfplay.json").read_text())
  assert data["budget"]["steps"] == sp.SMOKE.steps and data["tau"] == TAU
  results = data["results"]
  rows = _markdown_rows(table)
  want = [
      dict(zip(sp.HEADER, sp.format_row(game, method, m), strict=True))
      for game, result in results.items()
      for method, m in result["methods"].items()
  ]
  assert rows == want
  assert len(rows) == 5 * len(sp.method_names())
  for result in results.values():
    p = np.asarray(result["preference"])
    for method, m in result["methods"].items():
      pi = np.asarray(m["probs"])
      assert 0.0 <= m["exploitability"] <= 0.5, method
      assert m["exploitability"] == pytest.approx(float(np.max(p @ pi)) - 0.5, abs=1e-9)
      assert m["win_vs_rlhf"] == pytest.approx(
          float(pi @ p @ np.asarray(result["methods"]["RLHF (BT reward)"]["probs"]))
      )
  # the claim: on the majority game RLHF picks R, self-play the Condorcet winner B
  majority = results["majority (2: R>G>B, 3: B>R>G)"]
  assert majority["condorcet_winner"] == "B"
  row = majority["methods"]
  assert row["RLHF (BT reward)"]["mode"] == "R" and row["RLHF (BT reward)"]["p_condorcet"] < 0.1
  for name in ("online IPO", "Nash-MD (β = ητ)", "Nash-MD-PG β=0", "SPO (Hedge, avg.)"):
    assert row[name]["p_condorcet"] > 0.5, name
    assert row[name]["win_vs_rlhf"] > 0.5, name
  # on rock–paper–scissors SPO and Nash-MD are far less exploitable than RLHF
  row = results["rock–paper–scissors"]["methods"]
  rlhf = row["RLHF (BT reward)"]["exploitability"]
  assert row["SPO (Hedge, avg.)"]["exploitability"] < 0.2 * rlhf
  assert row["Nash-MD (β = ητ)"]["exploitability"] < 0.2 * rlhf
  assert all(data["claims"].values()), data["claims"]
  assert "FAILS" not in table
