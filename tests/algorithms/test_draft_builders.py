"""DRaFT with pytree conditions, decode/reward builders and a once-per-loss `prepare`.

Each test compares against an independent path: the array-cond loss, a reward_fn closure,
the composition of `sample_differentiable`, decode and reward differentiated directly, and
the LoRA merge done inside the builder. The merge's placement is read off the jaxpr.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax.algorithms import draft
from alignjax.diffusion import schedules
from alignjax.training import TrainState

N_TRAIN = 20
SCHEDULE = schedules.make_schedule("linear", N_TRAIN, beta_start=0.05, beta_end=0.3)
SHAPE = (4, 4, 1)
D = 16  # elements of one sample
R = 3  # LoRA rank: no other dimension of the test has size 3
S = 5  # length of the cond's unused "extra" leaf
B = 2
NULL = 10
VARIANTS = {
    "full": dict(truncation_k=None, lv_samples=0),
    "k2": dict(truncation_k=2, lv_samples=0),
    "lv": dict(truncation_k=None, lv_samples=4),
}


def _frozen(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "W0": jnp.asarray(rng.normal(size=(D, D)) * 0.3, jnp.float32),
      "emb_t": jnp.asarray(rng.normal(size=(N_TRAIN, D)) * 0.3, jnp.float32),
      "emb_c": jnp.asarray(rng.normal(size=(NULL + 1, D)) * 0.3, jnp.float32),
  }


def _lora(seed=1):
  rng = np.random.default_rng(seed)
  return {
      "A": jnp.asarray(rng.normal(size=(D, R)) * 0.3, jnp.float32),
      "B": jnp.asarray(rng.normal(size=(R, D)) * 0.3, jnp.float32),
  }


def _ids(c):
  """The class ids of an array cond, or of the dict cond (whose "extra" is checked, unread)."""
  if isinstance(c, dict):
    assert c["extra"].shape == (c["ids"].shape[0], S), c["extra"].shape
    return c["ids"]
  return c


def _linear_eps(weight, frozen):
  """eps = tanh(x W + emb_t[t] + emb_c[ids]) on flattened x."""

  def eps(x, t, c):
    h = x.reshape(x.shape[0], -1) @ weight + frozen["emb_t"][t] + frozen["emb_c"][_ids(c)]
    return jnp.tanh(h).reshape(x.shape)

  return eps


def merging_builder(trainable, frozen):
  """The LoRA merge W = W0 + A B done inside the builder (no `prepare`)."""
  return _linear_eps(frozen["W0"] + trainable["A"] @ trainable["B"], frozen)


def lora_prepare(trainable, frozen):
  return {"W": frozen["W0"] + trainable["A"] @ trainable["B"]}


def prepared_builder(prepared, frozen):
  return _linear_eps(prepared["W"], frozen)


def base_builder(frozen):
  return _linear_eps(frozen["W0"], frozen)


def cond_reward(images, cond):
  """Mean brightness weighted by the class: reads only the ids."""
  ids = _ids(cond).astype(jnp.float32)
  return jnp.mean(images, axis=(1, 2, 3)) * (1.0 + 0.1 * ids)


def _options(**overrides):
  defaults = dict(
      eps_fn_builder=merging_builder,
      schedule=SCHEDULE,
      reward_fn=cond_reward,
      num_steps=4,
      eta=0.5,
      guidance_scale=2.0,
      null_cond=NULL,
      shape=SHAPE,
      kl_weight=0.3,
      base_eps_fn_builder=base_builder,
  )
  return {**defaults, **overrides}


def _gradient(trainable, frozen, cond, key, **options):
  return jax.jit(lambda p, f, c, k: draft.reward_gradient(p, f, c, k, **options))(
      trainable, frozen, cond, key
  )


def _assert_trees_close(a, b, rtol=1e-5):
  """Leafwise, up to float32 rounding relative to the leaf's largest entry."""
  close = lambda u, v: np.testing.assert_allclose(
      u, v, rtol=rtol, atol=rtol * float(np.max(np.abs(v)))
  )
  jax.tree_util.tree_map(close, a, b)


IDS = jnp.asarray([3, 7], jnp.int32)
DICT_COND = {"ids": IDS, "extra": jnp.arange(B * S, dtype=jnp.float32).reshape(B, S)}
DICT_NULL = {"ids": NULL, "extra": jnp.zeros((S,), jnp.float32)}


# ----------------------------------------------------------------------------- pytree cond


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pytree_cond_gives_the_array_conds_loss_and_gradient(variant):
  """{"ids", "extra"} read through "ids" only == the ids array (guided, with the eq. 5 penalty)."""
  options = {**_options(), **VARIANTS[variant]}
  key = jax.random.key(0)
  g_arr, m_arr = _gradient(_lora(), _frozen(), IDS, key, **options)
  g_tree, m_tree = _gradient(
      _lora(), _frozen(), DICT_COND, key, **{**options, "null_cond": DICT_NULL}
  )
  assert float(m_arr["loss"]) != 0.0 and float(m_arr["kl_penalty"]) > 0.0
  np.testing.assert_allclose(m_tree["loss"], m_arr["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_tree["reward_mean"], m_arr["reward_mean"], rtol=1e-6)
  _assert_trees_close(g_tree, g_arr)
  assert np.all(np.abs(np.asarray(g_arr["A"])) > 0)


def test_lv_tiles_every_cond_leaf_copy_major():
  """Row j*B + b of every leaf is example b's condition, as for the re-noised samples."""
  params = lora_prepare(_lora(), _frozen())
  final = jax.random.normal(jax.random.key(1), (B,) + SHAPE)
  _, cond_n, _ = draft.lv_denoise(
      prepared_builder,
      params,
      _frozen(),
      SCHEDULE,
      final,
      DICT_COND,
      jax.random.key(2),
      num_steps=4,
      lv_samples=3,
  )
  np.testing.assert_array_equal(cond_n["ids"], np.tile(np.asarray(IDS), 3))
  np.testing.assert_array_equal(cond_n["extra"], np.tile(np.asarray(DICT_COND["extra"]), (3, 1)))


def test_mismatched_cond_leaves_are_refused():
  bad = {"ids": IDS, "extra": jnp.zeros((B + 1, S))}
  with pytest.raises(ValueError, match="one condition per example"):
    draft.draft_loss(_lora(), _frozen(), bad, jax.random.key(0), **_options())


# ----------------------------------------------------------------------------- decode and reward builders


@pytest.mark.parametrize("variant", ["full", "lv"])
def test_reward_builder_equals_the_reward_fn_closure(variant):
  """Weights in frozen (reward_builder, default decode spelled out) == the same closure."""
  weights = jnp.linspace(0.5, 1.5, D, dtype=jnp.float32).reshape(SHAPE)
  closure = lambda images, cond: jnp.mean(images * weights, axis=(1, 2, 3)) * (1.0 + _ids(cond))
  frozen = {**_frozen(), "reward_w": weights}
  builder = lambda f: (
      lambda images, cond: jnp.mean(images * f["reward_w"], axis=(1, 2, 3)) * (1.0 + _ids(cond))
  )
  base = {**_options(reward_fn=None), **VARIANTS[variant]}
  key = jax.random.key(3)
  g_ref, m_ref = _gradient(_lora(), frozen, IDS, key, **{**base, "reward_fn": closure})
  g, m = _gradient(
      _lora(),
      frozen,
      IDS,
      key,
      **base,
      reward_builder=builder,
      decode_builder=lambda f: draft.images_from,
  )
  np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-6)
  _assert_trees_close(g, g_ref)


def test_decode_is_inside_the_differentiated_path():
  """∇ of −mean r(decode(x_T)) with a learned-looking decoder (x_T -> [B, 5] features),
  against the composition of sample_differentiable, decode and reward differentiated here."""
  rng = np.random.default_rng(5)
  frozen = {
      **_frozen(),
      "dec": jnp.asarray(rng.normal(size=(D, 5)), jnp.float32),
      "rw": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
  }
  decode_builder = lambda f: (lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ f["dec"]))
  reward_builder = lambda f: (lambda feats, cond: feats @ f["rw"] + 0.0 * _ids(cond))
  key = jax.random.key(4)
  options = _options(reward_fn=None, kl_weight=0.0, base_eps_fn_builder=None, truncation_k=3)
  grads, metrics = _gradient(
      _lora(),
      frozen,
      IDS,
      key,
      **options,
      decode_builder=decode_builder,
      reward_builder=reward_builder,
  )

  def reference(trainable):
    chain_key, _ = jax.random.split(key)  # draft_loss's split
    x, _ = draft.sample_differentiable(
        merging_builder,
        trainable,
        frozen,
        SCHEDULE,
        IDS,
        chain_key,
        num_steps=4,
        truncation_k=3,
        eta=0.5,
        guidance_scale=2.0,
        null_cond=NULL,
        shape=SHAPE,
    )
    return -jnp.mean(reward_builder(frozen)(decode_builder(frozen)(x), IDS))

  loss_ref, g_ref = jax.jit(jax.value_and_grad(reference))(_lora())
  np.testing.assert_allclose(metrics["loss"], loss_ref, rtol=1e-6)
  _assert_trees_close(grads, g_ref)
  assert np.all(np.abs(np.asarray(grads["A"])) > 0)


def test_reward_weights_are_data_of_the_compiled_update():
  """Doubling the reward weights in frozen doubles the reward, without retracing."""
  traces = []

  def reward_builder(f):
    traces.append(1)
    return lambda images, cond: jnp.mean(images, axis=(1, 2, 3)) * f["scale"]

  opt = optax.sgd(0.0)
  update = jax.jit(
      draft.make_update_fn(
          merging_builder,
          SCHEDULE,
          None,
          opt,
          num_steps=3,
          shape=SHAPE,
          reward_builder=reward_builder,
      )
  )
  state = TrainState.create(_lora(), opt, jax.random.key(0))
  rewards = []
  for scale in (1.0, 2.0):
    frozen = {**_frozen(), "scale": jnp.asarray(scale, jnp.float32)}
    _, metrics = update(state, frozen, IDS, jax.random.key(7))
    rewards.append(float(metrics["reward_mean"]))
  assert len(traces) == 1
  np.testing.assert_allclose(rewards[1], 2.0 * rewards[0], rtol=1e-6)


@pytest.mark.parametrize(
    "override,error,match",
    [
        (dict(reward_fn=None), ValueError, "exactly one of reward_fn"),
        (dict(reward_builder=lambda f: cond_reward), ValueError, "exactly one of reward_fn"),
        (dict(decode_builder="vae"), TypeError, "decode_builder must be None or callable"),
        (dict(prepare=3), TypeError, "prepare must be None or callable"),
    ],
)
def test_reward_and_builder_options_are_checked_at_build_time(override, error, match):
  options = dict(
      eps_fn_builder=merging_builder,
      schedule=SCHEDULE,
      reward_fn=cond_reward,
      optimizer=optax.sgd(0.1),
      num_steps=4,
      shape=SHAPE,
  )
  with pytest.raises(error, match=match):
    draft.make_update_fn(**{**options, **override})


# ----------------------------------------------------------------------------- prepare


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _dots_inside_scans(jaxpr, inside=False):
  """Operand shapes of every dot_general nested in a scan body of `jaxpr`."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and inside:
      found.append(tuple(v.aval.shape for v in eqn.invars))
    for sub in _sub_jaxprs(eqn.params):
      found += _dots_inside_scans(sub, inside or eqn.primitive.name == "scan")
  return found


@pytest.mark.parametrize("remat_policy", ["full", "none"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prepare_gives_the_same_loss_and_gradient_once_per_loss(variant, remat_policy):
  """LoRA merged by `prepare` == merged in the builder; prepare is traced once per loss and
  no rank-R matmul (the merge or its transpose) is left inside the chain's scans."""
  calls = []

  def counted_prepare(trainable, frozen):
    calls.append(1)
    return lora_prepare(trainable, frozen)

  options = {**_options(remat_policy=remat_policy), **VARIANTS[variant]}
  prepared = {**options, "eps_fn_builder": prepared_builder, "prepare": counted_prepare}
  key = jax.random.key(11)
  g_ref, m_ref = _gradient(_lora(), _frozen(), IDS, key, **options)
  g, m = _gradient(_lora(), _frozen(), IDS, key, **prepared)
  assert len(calls) == 1
  np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-6)
  np.testing.assert_allclose(m["kl_penalty"], m_ref["kl_penalty"], rtol=1e-6)
  _assert_trees_close(g, g_ref)

  grad_fn = lambda opts: (lambda p: draft.reward_gradient(p, _frozen(), IDS, key, **opts))
  rank_r = lambda opts: [
      s for s in _dots_inside_scans(jax.make_jaxpr(grad_fn(opts))(_lora()).jaxpr) if R in sum(s, ())
  ]
  assert rank_r(options), "the builder's merge should sit inside the scans"  # the check works
  assert not rank_r(prepared)


def test_variant_options_give_each_variants_truncation_and_lv_samples():
  assert draft.variant_options("full", 5, 2) == dict(truncation_k=None, lv_samples=0)
  assert draft.variant_options("k", 5, 2) == dict(truncation_k=5, lv_samples=0)
  assert draft.variant_options("1", 5, 2) == dict(truncation_k=1, lv_samples=0)
  assert draft.variant_options("lv", 5, 2) == dict(truncation_k=None, lv_samples=2)
  with pytest.raises(ValueError, match=r"'k10'.*\('full', 'k', '1', 'lv'\)"):
    draft.variant_options("k10", 5, 2)
