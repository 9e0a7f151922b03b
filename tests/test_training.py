"""alignjax.training.warmup_cosine_adamw: the pretraining schedule and optimizer."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alignjax import training


def _train(max_grad_norm):
  return ml_collections.ConfigDict(
      dict(
          learning_rate=1e-2,
          warmup_steps=4,
          steps=20,
          end_lr_fraction=0.1,
          weight_decay=0.0,
          max_grad_norm=max_grad_norm,
      )
  )


def test_schedule_warms_up_linearly_then_decays_by_a_cosine_to_the_end_fraction():
  _, schedule = training.warmup_cosine_adamw(_train(1.0))
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4)], [0.0, 5e-3, 1e-2], rtol=1e-6)
  low = 1e-3  # learning_rate * end_lr_fraction
  for step in (8, 12, 20):
    expected = low + (1e-2 - low) * 0.5 * (1 + math.cos(math.pi * (step - 4) / 16))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def _two_updates(tx):
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  total = jnp.zeros(3)
  for g in (jnp.array([30.0, 40.0, 0.0]), jnp.array([0.3, -0.1, 0.2])):  # norms 50, ~0.37
    updates, state = tx.update({"w": g}, state, params)
    total = total + updates["w"]
  return np.asarray(total)


def test_gradients_are_clipped_to_the_global_norm_only_when_asked():
  for max_norm in (1.0, 0.0):
    tx, schedule = training.warmup_cosine_adamw(_train(max_norm))
    clip = optax.clip_by_global_norm(max_norm) if max_norm > 0 else optax.identity()
    reference = optax.chain(clip, optax.adamw(schedule, weight_decay=0.0))
    np.testing.assert_allclose(_two_updates(tx), _two_updates(reference), rtol=1e-6)
  clipped = _two_updates(training.warmup_cosine_adamw(_train(1.0))[0])
  unclipped = _two_updates(training.warmup_cosine_adamw(_train(0.0))[0])
  assert np.abs(clipped - unclipped).max() > 1e-6  # the clipping changes Adam's moments


# ----------------------------------------------------------------------------- TrainState


def _step_compilations(params):
  """(state, XLA compilations) of a donated jitted AdamW step called three times from
  TrainState.create (counted by jax.monitoring's backend-compile events)."""
  import jax  # pylint: disable=import-outside-toplevel

  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = training.TrainState.create(params, opt, jax.random.key(0))
  step = jax.jit(
      lambda s: s.apply_gradients(jax.tree.map(jnp.ones_like, s.params), opt), donate_argnums=0
  )
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(3):
      state = step(state)
    jax.block_until_ready(state)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert int(state.step) == 3
  return state, sum(e == "/jax/core/compile/backend_compile_duration" for e in compiles)


def test_create_commits_every_leaf_where_the_params_are_so_a_step_compiles_once():
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  device = jax.devices()[1]
  state, compiled = _step_compilations({"w": jax.device_put(jnp.ones((8, 2)), device)})
  assert compiled == 1
  assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(state))

  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  sharded = jax.device_put(
      jnp.ones((8, 2)), NamedSharding(mesh, P("data", None))
  )  # specs as jit returns them
  state = training.TrainState.create({"w": sharded}, optax.adamw(1e-3), jax.random.key(0))
  assert state.step.committed and state.step.sharding == NamedSharding(mesh, P())
  assert state.params["w"].sharding == sharded.sharding  # placed leaves are left alone
  assert _step_compilations({"w": sharded})[1] == 1

  # params not placed yet: nothing is placed for them
  state = training.TrainState.create(
      {"w": np.ones((2,), np.float32)}, optax.sgd(1.0), jax.random.key(0)
  )
  assert not state.step.committed
