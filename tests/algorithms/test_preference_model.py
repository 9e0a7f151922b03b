"""Bradley–Terry and preference-model losses and trainers, against exact answers: a BT
reward recovers true rewards (transitive data); on cyclic preferences a GPM preference model
is right on held-out pairs where every BT reward is near chance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax.algorithms import preference_model as pm
from alignjax.models import heads
from alignjax.models.lm_config import LMConfig

PAD, BOS, SEP, FIRST_ITEM = 0, 1, 2, 3


def tiny_config(num_items: int) -> LMConfig:
  return LMConfig(
      family="llama",
      vocab_size=FIRST_ITEM + num_items,
      hidden_size=32,
      num_layers=2,
      num_heads=2,
      num_kv_heads=2,
      head_dim=16,
      mlp_dim=64,
      max_position_embeddings=16,
  )


def item_pairs(a, b, labels) -> pm.PreferencePairs:
  """Prompt [BOS], responses one item token each."""
  n = len(a)
  one = lambda ids: np.asarray(ids, np.int32).reshape(n, 1) + FIRST_ITEM
  return pm.PreferencePairs(
      prompt_tokens=np.full((n, 1), BOS, np.int32),
      prompt_valid=np.ones((n, 1), bool),
      a_tokens=one(a),
      a_valid=np.ones((n, 1), bool),
      b_tokens=one(b),
      b_valid=np.ones((n, 1), bool),
      labels=np.asarray(labels, np.float32),
  )


def split_pairs(num_items, test_fraction, rng):
  """All unordered item pairs, randomly oriented, split so no held-out pair is trained on."""
  i, j = np.triu_indices(num_items, 1)
  flip = rng.random(len(i)) < 0.5
  a, b = np.where(flip, j, i), np.where(flip, i, j)
  order = rng.permutation(len(a))
  n_test = int(round(test_fraction * len(a)))
  return (a[order[n_test:]], b[order[n_test:]]), (a[order[:n_test]], b[order[:n_test]])


# --------------------------------------------------------------------------- losses


def test_losses_match_hand_computed_values():
  rc, rr = jnp.array([2.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 1.0])
  d = np.array([1.0, 0.0, -2.0])
  hard = -np.log(1 / (1 + np.exp(-d)))
  np.testing.assert_allclose(pm.bradley_terry_loss(rc, rr), hard.mean(), rtol=1e-6)
  p = jnp.array([0.9, 0.5, 0.2])
  soft = -(p * np.log(1 / (1 + np.exp(-d))) + (1 - p) * np.log(1 / (1 + np.exp(d))))
  np.testing.assert_allclose(pm.bradley_terry_loss(rc, rr, p), soft.mean(), rtol=1e-6)
  np.testing.assert_allclose(pm.preference_loss(jnp.asarray(d), p), soft.mean(), rtol=1e-6)
  w = jnp.array([1.0, 0.0, 3.0])
  np.testing.assert_allclose(
      pm.preference_loss(jnp.asarray(d), p, w), (soft[0] + 3 * soft[2]) / 4, rtol=1e-6
  )
  assert float(pm.preference_loss(jnp.asarray(d), p, jnp.zeros(3))) == 0.0
  # Swapping chosen and rejected with flipped labels is the same loss (antisymmetry).
  np.testing.assert_allclose(
      pm.bradley_terry_loss(rr, rc, 1 - p), pm.bradley_terry_loss(rc, rr, p), rtol=1e-6
  )
  with pytest.raises(ValueError, match="same shape"):
    pm.bradley_terry_loss(rc, rr[:2])
  with pytest.raises(ValueError, match="same shape"):
    pm.preference_loss(jnp.asarray(d), p[:2])


def test_pairs_check_names_the_bad_field():
  good = item_pairs([0, 1], [1, 0], [1.0, 0.0])
  good.check()
  with pytest.raises(ValueError, match="labels must be probabilities"):
    item_pairs([0], [1], [1.5]).check()
  bad = good.replace(b_tokens=np.zeros((2, 2), np.int32), b_valid=np.ones((2, 2), bool))
  with pytest.raises(ValueError, match="a_tokens .* and b_tokens .* same shape"):
    bad.check()


def test_tabular_bradley_terry_recovers_true_rewards():
  """Population minimiser of eq. 1: soft labels σ(r*_i − r*_j) over a connected pair design
  give r = r* + c exactly; sampled hard labels give r ≈ r* (correlation > 0.99)."""
  rng = np.random.default_rng(0)
  k = 12
  r_true = rng.normal(0, 1.5, k)
  i, j = np.triu_indices(k, 1)
  soft = 1 / (1 + np.exp(-(r_true[i] - r_true[j])))

  def fit(a, b, labels, steps):
    opt = optax.adam(0.1)
    r = jnp.zeros(k)
    state = opt.init(r)

    @jax.jit
    def step(r, state):
      g = jax.grad(lambda r: pm.bradley_terry_loss(r[a], r[b], labels))(r)
      u, state = opt.update(g, state)
      return optax.apply_updates(r, u), state

    for _ in range(steps):
      r, state = step(r, state)
    return np.asarray(r - r.mean())

  exact = fit(i, j, soft, 1500)
  np.testing.assert_allclose(exact, r_true - r_true.mean(), atol=2e-3)
  n = 40  # sampled labels per pair
  ii, jj = np.repeat(i, n), np.repeat(j, n)
  hard = (rng.random(len(ii)) < np.repeat(soft, n)).astype(np.float32)
  sampled = fit(ii, jj, hard, 1500)
  corr = np.corrcoef(sampled, r_true)[0, 1]
  assert corr > 0.99, corr


# --------------------------------------------------------------------------- LM backbones


def test_reward_model_on_lm_backbone_beats_chance_on_held_out_pairs():
  """BT-sampled labels on 16 items; held-out pairs scored against the true P (eq. 4)."""
  rng = np.random.default_rng(1)
  k = 16
  r_true = np.linspace(-3, 3, k)[rng.permutation(k)]
  (a, b), (ta, tb) = split_pairs(k, 0.25, rng)
  p = lambda a, b: 1 / (1 + np.exp(-(r_true[a] - r_true[b])))
  reps = 8  # label samples per training pair
  a, b = np.repeat(a, reps), np.repeat(b, reps)
  train = item_pairs(a, b, (rng.random(len(a)) < p(a, b)).astype(np.float32))
  test = item_pairs(ta, tb, p(ta, tb))
  model = heads.RewardModel(tiny_config(k), rngs=nnx.Rngs(0))
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, 80))
  result = pm.train_reward_model(model, train, test, steps=80, batch_size=128, optimizer=opt)
  bayes = float(np.mean(np.maximum(p(ta, tb), 1 - p(ta, tb))))
  print(f"BT reward model held-out accuracy {result.test_accuracy:.3f} (Bayes {bayes:.3f})")
  assert result.test_accuracy > 0.5 + 0.7 * (bayes - 0.5)
  assert result.train_loss[-1] < result.train_loss[0]
  prompts = np.full((k, 1), BOS, np.int32)
  learned = result.model.reward(
      prompts, np.ones((k, 1), bool), np.arange(k)[:, None] + FIRST_ITEM, np.ones((k, 1), bool)
  )
  assert np.corrcoef(np.asarray(learned), r_true)[0, 1] > 0.9


@pytest.mark.slow
def test_cyclic_preferences_preference_model_vs_bradley_terry():
  """K = 31 items on a circle, θ_i = 2π π(i) / K, a ≻ b iff sin(θ_a − θ_b) > 0: a regular
  tournament (each item beats 15 of 30), which no reward can order. Nearly antipodal pairs
  (|θ_a − θ_b| = π ± π/K, where |sin| = 0.1) are left out of both splits. A GPM (k = 1)
  on a tiny LM fits the held-out pairs; a BT reward on the same backbone does not."""
  rng = np.random.default_rng(2)
  k = 31
  theta = 2 * np.pi * rng.permutation(k) / k
  (a, b), (ta, tb) = split_pairs(k, 0.25, rng)
  margin = lambda a, b: np.abs(np.sin(theta[a] - theta[b])) > np.sin(np.pi / k) + 1e-6
  (a, b), (ta, tb) = (a[margin(a, b)], b[margin(a, b)]), (ta[margin(ta, tb)], tb[margin(ta, tb)])
  label = lambda a, b: (np.sin(theta[a] - theta[b]) > 0).astype(np.float32)
  train, test = item_pairs(a, b, label(a, b)), item_pairs(ta, tb, label(ta, tb))
  assert len(test) > 100 and not set(zip(ta, tb)) & (set(zip(a, b)) | set(zip(b, a)))
  steps = 80
  opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
  gpm = heads.GeneralPreferenceModel(tiny_config(k), dim=2, rngs=nnx.Rngs(0))
  pref = pm.train_preference_model(gpm, train, test, steps=steps, batch_size=128, optimizer=opt)
  bt = heads.RewardModel(tiny_config(k), rngs=nnx.Rngs(0))
  bt = pm.train_reward_model(bt, train, test, steps=steps, batch_size=128, optimizer=opt)
  print(
      f"cyclic: {len(train)} train / {len(test)} held-out pairs; held-out accuracy GPM "
      f"{pref.test_accuracy:.3f}, BT {bt.test_accuracy:.3f}"
  )
  assert pref.test_accuracy >= 0.95
  # BT fits the training imbalance, which the balanced tournament reverses on held-out pairs:
  # it is near or below chance.
  assert bt.test_accuracy < 0.6
  acc, ll = pm.evaluate_accuracy(*nnx.split(pref.model), test)
  assert (acc, ll) == (pref.test_accuracy, pref.test_log_likelihood)
  assert ll > bt.test_log_likelihood


def test_train_preference_model_refuses_a_reward_model():
  pairs = item_pairs([0], [1], [1.0])
  with pytest.raises(TypeError, match="PairwisePreferenceModel.*train_reward_model"):
    pm.train_preference_model(heads.RewardModel(tiny_config(2), rngs=nnx.Rngs(0)), pairs, pairs)
  with pytest.raises(TypeError, match="expected a RewardModel"):
    pm.train_reward_model(
        heads.GeneralPreferenceModel(tiny_config(2), rngs=nnx.Rngs(0)), pairs, pairs
    )
