"""alignjax.finite: the non-finite mask (eqs. 1-2), stop and skip (eq. 3), the host monitor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignjax import configs, finite, training


def _quadratic_step(optimizer):
  """A TrainState step on loss = Σ (θ - 3)², reporting loss and gradient norm."""

  def step(state, scale):
    loss_fn = lambda p: scale * jnp.sum((p["w"] - 3.0) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads, optimizer), {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
    }

  return step


def _state(optimizer):
  return training.TrainState.create({"w": jnp.zeros(4)}, optimizer, jax.random.key(0))


def test_tree_finite_and_mask_bits():
  assert bool(finite.tree_finite({"a": jnp.ones(3), "n": jnp.arange(3)}))
  assert not bool(finite.tree_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}))
  assert bool(finite.tree_finite({}))
  params, opt = {"w": jnp.array([jnp.nan])}, {"m": jnp.ones(1)}
  mask = finite.nonfinite_mask({"loss": jnp.float32(1.0), "grad_norm": jnp.inf}, params, opt)
  assert int(mask) == 0b0110  # bit 1: grad_norm, bit 2: params (eq. 1)
  assert finite.describe(mask) == ["grad_norm", "params"]
  assert int(finite.nonfinite_mask({}, None, None)) == 0


def test_guard_stop_passes_the_update_through_and_flags_it():
  opt = optax.sgd(0.1)
  guarded = jax.jit(finite.guard(_quadratic_step(opt), "stop"))
  state, metrics, mask = guarded(_state(opt), 1.0)
  assert int(mask) == 0
  np.testing.assert_allclose(state.params["w"], 0.6)  # 0 - 0.1 · 2 · (0 - 3)
  state, metrics, mask = guarded(state, jnp.inf)
  # loss = inf · 9.6; gradients inf · (-4.8) = -inf, so θ' = -inf: the norm is inf, not NaN
  assert finite.describe(mask) == ["loss", "grad_norm", "params"]
  assert not np.all(np.isfinite(state.params["w"]))  # "stop": the host stops, state is as computed


def test_guard_skip_keeps_the_input_state_exactly():
  opt = optax.adam(0.1)
  guarded = jax.jit(finite.guard(_quadratic_step(opt), "skip"), donate_argnums=0)
  state, _, _ = guarded(_state(opt), 1.0)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.step))
  state, metrics, mask = guarded(state, jnp.nan)
  assert int(mask) != 0 and np.isnan(metrics["loss"])
  after = jax.tree.map(np.asarray, (state.params, state.opt_state, state.step))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  state, _, mask = guarded(state, 1.0)  # and it trains on afterwards
  assert int(mask) == 0 and int(state.step) == 2


def test_monitor_stop_names_step_quantities_and_last_good_checkpoint():
  monitor = finite.Monitor("stop", unit="round", last_good=lambda: "step 4 in /w/checkpoints/4")
  assert monitor.check(5, jnp.int32(0))
  with pytest.raises(finite.NonFiniteError) as info:
    monitor.check(6, jnp.int32(0b0101))
  msg = str(info.value)
  assert msg.startswith("round 6: non-finite loss, params")
  assert "last good checkpoint: step 4 in /w/checkpoints/4" in msg


def test_monitor_skip_counts_and_stops_after_n_in_a_row():
  monitor = finite.Monitor("skip", max_consecutive_skips=3, unit="update")
  assert not monitor.check(1, 1) and not monitor.check(2, 1)
  assert monitor.check(3, 0)  # a good step resets the run of skips
  assert monitor.state_dict() == {"skipped": 2, "consecutive": 0}
  assert not monitor.check(4, 4) and not monitor.check(5, 4)
  with pytest.raises(
      finite.NonFiniteError, match=r"update 6: non-finite params \(3 updates in a row"
  ):
    monitor.check(6, 4)
  resumed = finite.Monitor.from_config(
      finite.config("skip", 3), {"finite": {"skipped": 4, "consecutive": 2}}
  )
  with pytest.raises(finite.NonFiniteError):
    resumed.check(7, 1)  # the count carries over a resume


def test_check_steps_names_the_first_bad_step_of_a_block():
  monitor = finite.Monitor("stop", unit="LM step")
  with pytest.raises(finite.NonFiniteError, match="LM step 13: non-finite loss"):
    monitor.check_steps(11, [jnp.int32(0), jnp.int32(0), jnp.int32(1), jnp.int32(1)])
  assert finite.Monitor("skip", 5).check_steps(1, [0, 1, 0]) == 2


def test_config_validation_and_host_tree_check():
  config = finite.config()
  finite.validate_config(_wrap(config))
  with pytest.raises(configs.ConfigError, match="config.finite.policy='ignore': must be one of"):
    finite.validate_config(_wrap(finite.config("ignore")))
  with pytest.raises(configs.ConfigError, match="max_consecutive_skips=0"):
    finite.validate_config(_wrap(finite.config("skip", 0)))
  finite.check_host_tree({"w": np.ones(2)}, "export")
  with pytest.raises(
      finite.NonFiniteError, match=r"export: non-finite values in 1 leaves \(\['b'\]\)"
  ):
    finite.check_host_tree({"w": np.ones(2), "b": np.array([np.nan])}, "export")


def _wrap(section):
  import ml_collections

  return ml_collections.ConfigDict({"finite": section})


def test_inf_is_rejected_by_validation():
  import ml_collections

  config = ml_collections.ConfigDict(
      dict(
          optimizer=dict(
              learning_rate=float("inf"),
              b1=0.9,
              b2=0.999,
              eps=1e-8,
              weight_decay=0.0,
              max_grad_norm=1.0,
          ),
          clip=float("inf"),
      )
  )
  with pytest.raises(
      configs.ConfigError, match=r"config.optimizer.learning_rate=inf: must be a finite"
  ):
    configs.check_optimizer(config)
  with pytest.raises(configs.ConfigError, match="must be a finite number"):
    configs.check_positive(config, "clip")
  configs.check_positive(config, "clip", allow_inf=True)  # fields where inf means "off"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 1.0
  with pytest.raises(
      configs.ConfigError, match=r"config.optimizer.b2=1.0: must lie in \[0.0, 1.0\)"
  ):
    configs.check_optimizer(config)
