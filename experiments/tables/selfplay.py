r"""Preference self-play against reward-model RLHF on tabular games (Nash-LHF, SPO).

  python -m experiments.tables.selfplay --workdir=runs/tables

Reproduces, at toy scale, the central claim of Nash-LHF (Munos et al. 2023, "Nash Learning
from Human Feedback") and SPO (Swamy et al. 2024, "A Minimaximalist Approach to Reinforcement
Learning from Human Feedback"): optimising the preference itself by self-play handles
intransitive preferences and preferences pooled over a population, where fitting a
Bradley–Terry reward and maximising it (RLHF, and DPO, which has the same minimiser) fails.
Writes <workdir>/selfplay.md (also printed) and selfplay.json.

Measured (2-core CPU shared with other jobs; τ = 0.05, default budget): 10.5-10.8 s for the
command, 7.2-7.4 s on the table's own clock. Exploitability (0 at the Nash equilibrium of P):

  game                 RLHF = DPO   online IPO = Nash-MD = π*_τ   β=0.125  β=0.5   SPO
  rock–paper–scissors  0.0738       0.0098                        0.0176   0.0644  0.0001
  3-cycle              0.1922       0.0283                        0.0292   0.0353  0.0004
  majority             0.0999       0.0217                        0.0215   0.0236  0.0010
  random 5×5           0.0400       0.0191                        0.0227   0.0319  0.0010
  transitive BT        0.0000       0.0095                        0.0095   0.0097  0.0008

On the majority game RLHF (and DPO) put 0.999 on R, the response the Bradley–Terry fit ranks
first, while every self-play method puts most mass on the Condorcet winner B (online IPO and
Nash-MD 0.78, SPO 0.99) and beats the RLHF policy head to head (P(π ≻ π_RLHF) = 0.57-0.60). On
the intransitive games RLHF is 2-8× more exploitable than π*_τ (online IPO, Nash-MD) and
40-770× more than SPO; its policy on rock–paper–scissors is μ itself (the fitted reward is
0). On the transitive control
every method's mode is the Condorcet winner; there RLHF is the least exploitable, since τ > 0
keeps π*_τ spread (exploitability 0.0095) while RLHF concentrates (1.000). DPO matches RLHF to
‖·‖₁ < 1e-4 and online IPO and Nash-MD (β = ητ, β = 0) match π*_τ to < 3e-4 on every game;
a fixed opponent mixture β > 0 moves Nash-MD-PG away from π*_τ and raises its
exploitability. SPO, unregularised, is the least exploitable on every intransitive game
(its average iterate approaches the minimax winner) and ignores μ. Every check of `claims`
holds; the smoke budget (--smoke, ~4 s) keeps the same conclusions.

Games (alignjax.algorithms.games notation: P[i, j] = P(i ≻ j), P + Pᵀ = 1):

- rock–paper–scissors (each beats the next with probability 1);
- a non-symmetric 3-cycle, P01 = 0.9, P12 = 0.6, P20 = 0.7;
- a population of 5 voters over (R, G, B): 2 rank R > G > B, 3 rank B > R > G (games eq. 10).
  B is the Condorcet winner (beats R and G 3 : 2), but R beats G unanimously, so the
  Bradley–Terry reward ranks R first;
- a random 5 × 5 game, P = ½ + A with A antisymmetric, A_ij ~ U(−½, ½) for i < j: the first
  draw from --seed with no Condorcet winner (seed 0: the 4th; its 1st has one and is nearly
  transitive, and the claim is about intransitive games);
- a transitive control, P_ij = σ(s_i − s_j) with s = (1, ½, 0, −½, −1): Bradley–Terry holds,
  response 0 is the Condorcet winner, and all methods should agree on it.

Methods, all with the same reference μ(y) ∝ 0.8^y (non-uniform: with a uniform μ, RLHF on
rock–paper–scissors would return the Nash equilibrium by symmetry) and the same τ (--tau):

  (1)  RLHF: r = the maximum-likelihood Bradley–Terry reward of P over all ordered pairs
       (games eq. 8), π ∝ μ exp(r / τ) (games eq. 9).
  (2)  DPO (alignjax.algorithms.dpo, β = τ): the loss on every ordered pair (i, j) with i
       chosen, weighted by P_ij, minimised with Adam over the policy's logits. With
       h_ij = g_i − g_j, g = log π − log μ, it is −Σ P_ij log σ(τ g_i − τ g_j), the negative
       log-likelihood (8) at r = τ g: its minimiser is RLHF's policy for *any* P, Bradley–Terry
       or not. The table computes it anyway (the column ‖π − π_RLHF‖₁ shows the match).
  (3)  Online IPO (policy_gradient eq. 8, tabular): the expected loss over y, y' ~ sg(π),
         L(π) = Σ_{y,y'} sg(π)(y) sg(π)(y') (g_y − g_y' − (P_yy' − ½) / τ)²,
       by SGD on the logits with the sampling law refreshed every step (constant step
       2 / (1 + (n / (4τ))²); 8× larger also converges). Its gradient in the logits is
       4 π_y (g_y − E_π g − ((P π)_y − ½) / τ), zero at an interior π iff π ∝ μ exp(P π / τ):
       the Nash equilibrium π*_τ of the regularised game (games eq. 5). (Adam, tried first,
       collapsed to a pure policy on rock–paper–scissors: the on-policy weights make every
       pure policy stationary, and Adam's step overshot into one.)
  (4)  Nash-MD (nash_md eqs. 8-10): the library's `nash_md`, mixture exponent β_t = η_t τ and
       η_t = 2 / (τ (t + 2)); it converges to π*_τ.
  (5)  Nash-MD-PG with a fixed opponent mixture β (nash_md eq. 1): the exact mirror-ascent
       (natural-gradient) step of P(π ≻ sg(π^β)) − τ KL(π ‖ μ),
         log π_{t+1} = log-softmax((1 − η_t τ) log π_t + η_t τ log μ + η_t P π_t^β),
       π^β ∝ π^(1−β) μ^β (games eq. 7), same η_t. β = η_t τ is (4). Its fixed point is
       π ∝ μ exp(P π^β / τ): π*_τ for β = 0, and for β > 0 the opponent leans to μ.
  (6)  SPO (spo eq. 5): Hedge self-play from π_0 = μ with η = sqrt(8 ln n / T), the average
       iterate π̄_T. No KL term: it targets the unregularised minimax winner.
  (7)  π*_τ itself (games.regularized_nash), and μ, for reference.

Columns: exploitability max_y P(y ≻ π) − ½ (games eq. 3, 0 at a Nash equilibrium of P; τ > 0
keeps π*_τ slightly above 0), P(π ≻ π_RLHF) = πᵀ P π_RLHF, P(π ≻ μ), the probability of the
Condorcet winner where there is one, the most probable response, ‖π − π*_τ‖₁ and
‖π − π_RLHF‖₁, and π. All math is float32 and exact (no sampling).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignjax import scripts
from alignjax.algorithms import dpo, games, nash_md, spo

scripts.make_importable(__file__, __package__)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Iterations (the defaults are the reported table)."""

  steps: int = 200_000  # Nash-MD, Nash-MD-PG, SPO and online IPO iterations
  adam_steps: int = 20_000  # DPO's Adam updates
  adam_lr: float = 0.3  # DPO's peak learning rate (cosine decay to 0)
  bt_iterations: int = 20_000  # Bradley–Terry gradient ascent (games.bradley_terry_fit)


SMOKE = Budget(steps=3_000, adam_steps=1_500, bt_iterations=3_000)

BETAS = (0.0, 0.125, 0.5)


# ============================================================================ games


def _cycle(p01: float, p12: float, p20: float) -> np.ndarray:
  p = np.full((3, 3), 0.5)
  for (i, j), v in {(0, 1): p01, (1, 2): p12, (2, 0): p20}.items():
    p[i, j], p[j, i] = v, 1.0 - v
  return p


def random_game(n: int, seed: int) -> tuple[np.ndarray, int]:
  """(P, draws): P = ½ + A, A antisymmetric with A_ij ~ U(−½, ½) above the diagonal, the
  first of `draws` games from one generator with no Condorcet winner (an intransitive game)."""
  rng = np.random.default_rng(seed)
  for draws in range(1, 1001):
    a = np.triu(rng.uniform(-0.5, 0.5, (n, n)), 1)
    p = 0.5 + a - a.T
    if condorcet_winner(p) is None:
      return p, draws
  raise RuntimeError(f"seed={seed}: no game without a Condorcet winner in 1000 draws")


def bradley_terry_game(scores) -> np.ndarray:
  s = np.asarray(scores, np.float64)
  return 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))


def make_games(seed: int) -> dict[str, dict]:
  """name -> {"preference": P (float64), "labels": response names}."""
  random_p, draws = random_game(5, seed)
  return {
      "rock–paper–scissors": {"preference": _cycle(0.0, 0.0, 0.0), "labels": ("R", "P", "S")},
      "3-cycle (0.9, 0.6, 0.7)": {
          "preference": _cycle(0.9, 0.6, 0.7),
          "labels": ("y0", "y1", "y2"),
      },
      "majority (2: R>G>B, 3: B>R>G)": {
          "preference": games.preference_from_rankings([[0, 1, 2]] * 2 + [[2, 0, 1]] * 3),
          "labels": ("R", "G", "B"),
      },
      f"random 5×5 (seed {seed})": {
          "preference": random_p,
          "draws": draws,
          "labels": tuple(f"y{i}" for i in range(5)),
      },
      "transitive BT (s = 1…−1)": {
          "preference": bradley_terry_game(np.linspace(1.0, -1.0, 5)),
          "labels": tuple(f"y{i}" for i in range(5)),
      },
  }


def reference_logits(n: int) -> np.ndarray:
  """log μ, μ(y) ∝ 0.8^y."""
  logits = np.arange(n) * np.log(0.8)
  return logits - np.log(np.sum(np.exp(logits)))


def condorcet_winner(p: np.ndarray) -> int | None:
  """The response that beats every other with probability > ½, if any."""
  n = p.shape[0]
  for y in range(n):
    if all(p[y, j] > 0.5 for j in range(n) if j != y):
      return y
  return None


# ============================================================================ methods


@functools.partial(jax.jit, static_argnames=("tau", "beta", "steps"))
def nash_md_pg(p, log_mu, *, tau: float, beta: float, steps: int) -> jax.Array:
  """Method (5): log π_T of mirror ascent on P(π ≻ sg(π^β)) − τ KL(π ‖ μ)."""

  def step(logits, t):
    eta = 2.0 / (tau * (t + 2.0))
    opponent = jnp.exp(games.geometric_mixture(logits, log_mu, beta=beta))
    mixed = (1.0 - eta * tau) * logits + eta * tau * log_mu
    return jax.nn.log_softmax(mixed + eta * (p @ opponent)), None

  logits, _ = jax.lax.scan(step, log_mu, jnp.arange(steps, dtype=jnp.float32))
  return logits


def _adam(lr: float, steps: int):
  return optax.adam(optax.cosine_decay_schedule(lr, steps))


@functools.partial(jax.jit, static_argnames=("tau", "steps", "lr"))
def dpo_policy(p, log_mu, *, tau: float, steps: int, lr: float) -> jax.Array:
  """Method (2): log π minimising the P-weighted DPO loss over all ordered pairs."""
  n = p.shape[0]
  chosen, rejected = np.nonzero(~np.eye(n, dtype=bool))
  weights = p[chosen, rejected]

  def loss(z):
    logp = jax.nn.log_softmax(z)
    value, _ = dpo.dpo_loss(
        logp[chosen], logp[rejected], log_mu[chosen], log_mu[rejected], beta=tau, weights=weights
    )
    return value

  optimizer = _adam(lr, steps)

  def step(carry, _):
    z, state = carry
    updates, state = optimizer.update(jax.grad(loss)(z), state)
    return (optax.apply_updates(z, updates), state), None

  (z, _), _ = jax.lax.scan(step, (log_mu, optimizer.init(log_mu)), None, length=steps)
  return jax.nn.log_softmax(z)


def online_ipo_expected_loss(z, sampling, p, log_mu, tau: float) -> jax.Array:
  """Method (3): the online IPO loss in expectation over y, y' ~ sampling (iid)."""
  g = jax.nn.log_softmax(z) - log_mu
  h = g[:, None] - g[None, :]
  return jnp.sum(sampling[:, None] * sampling[None, :] * jnp.square(h - (p - 0.5) / tau))


def online_ipo_lr(n: int, tau: float) -> float:
  """The constant SGD step of method (3), 2 / (1 + (n / (4τ))²)."""
  return 2.0 / (1.0 + (n / (4.0 * tau)) ** 2)


@functools.partial(jax.jit, static_argnames=("tau", "steps"))
def online_ipo_policy(p, log_mu, *, tau: float, steps: int) -> jax.Array:
  """Method (3): log π after `steps` SGD updates of self-play online IPO."""
  optimizer = optax.sgd(online_ipo_lr(p.shape[0], tau))

  def step(carry, _):
    z, state = carry
    sampling = jax.lax.stop_gradient(jax.nn.softmax(z))
    grads = jax.grad(online_ipo_expected_loss)(z, sampling, p, log_mu, tau)
    updates, state = optimizer.update(grads, state)
    return (optax.apply_updates(z, updates), state), None

  (z, _), _ = jax.lax.scan(step, (log_mu, optimizer.init(log_mu)), None, length=steps)
  return jax.nn.log_softmax(z)


def method_names() -> tuple[str, ...]:
  return (
      "reference μ",
      "RLHF (BT reward)",
      "DPO (all pairs)",
      "online IPO",
      "Nash-MD (β = ητ)",
      *(f"Nash-MD-PG β={b:g}" for b in BETAS),
      "SPO (Hedge, avg.)",
      "π*_τ (regularised Nash)",
  )


def solve(p_np: np.ndarray, *, tau: float, budget: Budget) -> dict[str, np.ndarray]:
  """method name -> π (float64 probabilities) on the game P."""
  n = p_np.shape[0]
  p = jnp.asarray(p_np, jnp.float32)
  log_mu = jnp.asarray(reference_logits(n), jnp.float32)
  rewards = games.bradley_terry_fit(p_np, iterations=budget.bt_iterations)
  out = {
      "reference μ": log_mu,
      "RLHF (BT reward)": games.rlhf_policy(rewards, log_mu, tau=tau),
      "DPO (all pairs)": dpo_policy(p, log_mu, tau=tau, steps=budget.adam_steps, lr=budget.adam_lr),
      "online IPO": online_ipo_policy(p, log_mu, tau=tau, steps=budget.steps),
      "Nash-MD (β = ητ)": nash_md.nash_md(p_np, log_mu, tau=tau, steps=budget.steps)[-1],
  }
  for beta in BETAS:
    out[f"Nash-MD-PG β={beta:g}"] = nash_md_pg(p, log_mu, tau=tau, beta=beta, steps=budget.steps)
  averages, _ = spo.self_play(
      p_np, eta=math.sqrt(8.0 * math.log(n) / budget.steps), steps=budget.steps, logits=log_mu
  )
  out["SPO (Hedge, avg.)"] = jnp.log(averages[-1])
  out["π*_τ (regularised Nash)"] = games.regularized_nash(p_np, log_mu, tau=tau)[0]
  probs = {}
  for name, logits in out.items():
    pi = np.exp(np.asarray(jax.nn.log_softmax(logits), np.float64))
    probs[name] = pi / pi.sum()
  return probs


def metrics(p: np.ndarray, pi: np.ndarray, ref: dict[str, np.ndarray], labels) -> dict:
  winner = condorcet_winner(p)
  return {
      "probs": pi.tolist(),
      "exploitability": float(np.max(p @ pi) - 0.5),
      "win_vs_rlhf": float(pi @ p @ ref["rlhf"]),
      "win_vs_reference": float(pi @ p @ ref["mu"]),
      "p_condorcet": None if winner is None else float(pi[winner]),
      "mode": labels[int(np.argmax(pi))],
      "l1_to_nash_tau": float(np.abs(pi - ref["nash"]).sum()),
      "l1_to_rlhf": float(np.abs(pi - ref["rlhf"]).sum()),
  }


def claims(results: dict, game_names: list[str]) -> dict[str, bool]:
  """The paper's claim, checked on each game."""
  rps, cycle, majority, rand, transitive = game_names
  selfplay = ("Nash-MD (β = ητ)", "Nash-MD-PG β=0", "SPO (Hedge, avg.)")
  out = {}
  row = results[majority]["methods"]
  out["majority: RLHF's mode is R, DPO's too"] = (
      row["RLHF (BT reward)"]["mode"] == "R" and row["DPO (all pairs)"]["mode"] == "R"
  )
  out["majority: online IPO, Nash-MD and SPO put most mass on B"] = all(
      row[m]["mode"] == "B" for m in ("online IPO", *selfplay)
  )
  for game in (rps, cycle, rand):
    row = results[game]["methods"]
    rlhf = row["RLHF (BT reward)"]["exploitability"]
    out[f"{game}: Nash-MD and SPO less exploitable than RLHF"] = all(
        row[m]["exploitability"] < rlhf for m in selfplay
    )
  row = results[transitive]["methods"]
  out[f"{transitive}: every method's mode is the Condorcet winner"] = all(
      r["mode"] == "y0" for name, r in row.items() if name != "reference μ"
  )
  return out


# ============================================================================ the table


def run(workdir: str, *, tau: float = 0.05, seed: int = 0, budget: Budget = Budget()) -> dict:
  """Solves every game with every method; writes and returns the table."""
  tau = games._positive("tau", tau)
  t0 = time.perf_counter()
  game_defs = make_games(seed)
  results = {}
  for name, game in game_defs.items():
    p = game["preference"]
    probs = solve(p, tau=tau, budget=budget)
    ref = {
        "rlhf": probs["RLHF (BT reward)"],
        "mu": probs["reference μ"],
        "nash": probs["π*_τ (regularised Nash)"],
    }
    winner = condorcet_winner(p)
    results[name] = {
        "preference": p.tolist(),
        "labels": list(game["labels"]),
        "condorcet_winner": None if winner is None else game["labels"][winner],
        **({"draws": game["draws"]} if "draws" in game else {}),
        "methods": {m: metrics(p, probs[m], ref, game["labels"]) for m in method_names()},
    }
    print(f"{name}: done ({time.perf_counter() - t0:.1f} s)", flush=True)
  checks = claims(results, list(game_defs))
  seconds = time.perf_counter() - t0
  table = format_table(results, checks, tau=tau, budget=budget, seconds=seconds)
  print(table, flush=True)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "selfplay.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "selfplay.json"), "w") as f:
    json.dump(
        {
            "results": results,
            "claims": checks,
            "tau": tau,
            "seed": seed,
            "betas": list(BETAS),
            "budget": dataclasses.asdict(budget),
            "seconds": seconds,
        },
        f,
        indent=2,
    )
  return {"results": results, "claims": checks, "table": table, "seconds": seconds}


HEADER = (
    "game",
    "method",
    "exploitability",
    "P(π ≻ π_RLHF)",
    "P(π ≻ μ)",
    "P(Condorcet winner)",
    "mode",
    "‖π − π*_τ‖₁",
    "‖π − π_RLHF‖₁",
    "π",
)


def format_row(game: str, method: str, m: dict) -> list[str]:
  return [
      game,
      method,
      f"{m['exploitability']:.4f}",
      f"{m['win_vs_rlhf']:.3f}",
      f"{m['win_vs_reference']:.3f}",
      "—" if m["p_condorcet"] is None else f"{m['p_condorcet']:.3f}",
      m["mode"],
      f"{m['l1_to_nash_tau']:.4f}",
      f"{m['l1_to_rlhf']:.4f}",
      " ".join(f"{x:.3f}" for x in m["probs"]),
  ]


def format_table(results: dict, checks: dict, *, tau: float, budget: Budget, seconds: float):
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for game, result in results.items():
    for method, m in result["methods"].items():
      lines.append("| " + " | ".join(format_row(game, method, m)) + " |")
  notes = [
      f"τ = {tau:g} for every method (DPO's β = τ); reference μ(y) ∝ 0.8^y; responses in the "
      "order of π. Exploitability = max_y P(y ≻ π) − ½ (0 at a Nash equilibrium of P).",
      f"Nash-MD, Nash-MD-PG, SPO and online IPO: {budget.steps} iterations (η_t = "
      "2/(τ(t+2)); SPO η = √(8 ln n / T); online IPO SGD step 2/(1 + (n/4τ)²)); DPO: "
      f"{budget.adam_steps} Adam updates (lr "
      f"{budget.adam_lr:g}, cosine decay); Bradley–Terry fit: {budget.bt_iterations} "
      "gradient-ascent steps.",
      "DPO on all pairs weighted by P is the Bradley–Terry likelihood at r = τ(log π − log μ), "
      "so its minimiser is RLHF's policy for every game (‖π − π_RLHF‖₁ ≈ 0); online IPO and "
      "Nash-MD (β = ητ or β = 0) converge to π*_τ (‖π − π*_τ‖₁ ≈ 0).",
  ]
  notes += [f"Claim — {name}: {'holds' if ok else 'FAILS'}." for name, ok in checks.items()]
  notes.append(f"Wall time {seconds:.1f} s.")
  return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(argv, workdir_flag, tau_flag, seed_flag, smoke_flag):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if workdir_flag.value is None:
    raise app.UsageError("--workdir is required (the table goes there)")
  budget = SMOKE if smoke_flag.value else Budget()
  run(workdir_flag.value, tau=tau_flag.value, seed=seed_flag.value, budget=budget)


def define_flags():
  return (
      flags.DEFINE_string("workdir", None, "Directory for selfplay.md/.json."),
      flags.DEFINE_float("tau", 0.05, "KL strength τ of every method."),
      flags.DEFINE_integer("seed", 0, "Seed of the random 5×5 game."),
      flags.DEFINE_bool("smoke", False, "Few iterations (for tests)."),
  )


if __name__ == "__main__":
  # Flags are defined when the script runs, not on import (tests import several tables).
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, *_FLAGS))
