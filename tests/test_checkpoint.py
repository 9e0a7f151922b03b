"""Tests for alignjax.checkpoint: round trips, retention, preemption, damage, mismatch."""

import glob
import hashlib
import logging
import os
import signal
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignjax import parallel, testing
from alignjax.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_like,
    content_hash,
    frozen_model_metadata,
    run_metadata,
)


@flax.struct.dataclass
class TrainState:
  params: nnx.State
  opt_state: optax.OptState
  step: jax.Array
  key: jax.Array


class MLP(nnx.Module):

  def __init__(self, din=16, hidden=64, *, rngs):
    self.l1 = nnx.Linear(din, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, 4, rngs=rngs)


def _init_fn(hidden=64, dtype=jnp.float32, seed=0, updates=2):
  """TrainState after `updates` Adam steps on made-up gradients (one function: one compile)."""
  opt = optax.adam(1e-2)

  def init():
    params = nnx.split(MLP(hidden=hidden, rngs=nnx.Rngs(seed)))[1]
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    state = TrainState(params, opt.init(params), jnp.int32(0), jax.random.key(seed))
    for _ in range(updates):
      grads = jax.tree.map(lambda p: jnp.cos(p + state.step), state.params)
      upd, opt_state = opt.update(grads, state.opt_state, state.params)
      key, _ = jax.random.split(state.key)
      state = TrainState(optax.apply_updates(state.params, upd), opt_state, state.step + 1, key)
    return state

  return init


def make_state(mesh, **kwargs):
  """A TrainState created already sharded on `mesh`."""
  return parallel.sharded_init(_init_fn(**kwargs), mesh, None)


def abstract_state(mesh, **kwargs):
  """ShapeDtypeStructs with the shardings `make_state` would give (no compile, no memory)."""
  shapes = jax.eval_shape(_init_fn(**kwargs))
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes,
      parallel.param_shardings(shapes, mesh),
  )


def assert_states_equal(a, b):
  assert type(a) is type(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = {
    "stats": {"0": [1.5, 2.25, 1e-7], "3": []},
    "position": 17,
    "name": "run",
    "flag": True,
    "none": None,
}


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh({"data": 2, "fsdp": 4})


@pytest.fixture(scope="module")
def state(mesh):
  return make_state(mesh)


# --------------------------------------------------------------------------- round trip
def test_round_trip_exact_and_onto_another_mesh(tmp_path, mesh, state):
  assert state.params["l1"]["kernel"].get_value().sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp"
  )
  ckpt = Checkpointer(
      tmp_path / "ckpt",
      save_every=5,
      keep=3,
      metadata={"base_model": {"path": "/m", "hash": "sha256:ab"}},
  )
  assert ckpt.maybe_save(10, state, HOST)
  abstract = abstract_like(state)
  ckpt.close()

  ckpt = Checkpointer(
      tmp_path / "ckpt",
      save_every=5,
      keep=3,
      metadata={"base_model": {"path": "/m", "hash": "sha256:ab"}},
  )
  assert ckpt.latest_step() == 10
  restored, host = ckpt.restore(abstract)
  assert_states_equal(restored, state)
  assert host == HOST
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert x.sharding == y.sharding
  assert int(restored.step) == 2

  other = parallel.make_mesh({"data": 1, "fsdp": 8})  # restore onto another mesh
  target = abstract_state(other)
  restored, _ = ckpt.restore(target, step=10)
  assert_states_equal(restored, state)
  assert restored.params["l1"]["kernel"].get_value().sharding.mesh.shape["fsdp"] == 8
  plain = jax.eval_shape(lambda: state)  # no shardings: default device
  restored, _ = ckpt.maybe_restore(plain)
  assert_states_equal(restored, state)
  ckpt.close()


def test_raw_uint32_key_and_empty_directory(tmp_path):
  state = {"w": jnp.arange(4.0), "key": jax.random.PRNGKey(3)}
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None)
  assert ckpt.latest_step() is None and ckpt.maybe_restore(state) is None
  with pytest.raises(CheckpointError, match="no checkpoint in"):
    ckpt.restore(state)
  ckpt.maybe_save(1, state, {})
  restored, host = ckpt.restore(state)
  np.testing.assert_array_equal(restored["key"], state["key"])
  assert host == {}
  with pytest.raises(CheckpointError, match="no checkpoint for step 2.*available steps: \\[1\\]"):
    ckpt.restore(state, step=2)
  ckpt.close()


# --------------------------------------------------------------------------- schedule
def test_save_every_keep_last_and_force(tmp_path):
  state = {"w": jnp.zeros(3)}
  ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
  saved = [s for s in range(1, 8) if ckpt.maybe_save(s, state, {"s": s})]
  assert saved == [2, 4, 6]
  assert ckpt.maybe_save(7, state, {"s": 7}, force=True)  # the final save
  assert not ckpt.maybe_save(7, state, {"s": 7}, force=True)  # not twice
  assert ckpt.all_steps() == [6, 7]
  assert sorted(os.listdir(tmp_path)) == ["6", "7"]
  assert ckpt.restore(state)[1] == {"s": 7}
  ckpt.close()
  only_forced = Checkpointer(tmp_path / "f", save_every=None, keep=None)
  assert not any(only_forced.maybe_save(s, state, {}) for s in range(1, 5))
  assert only_forced.maybe_save(5, state, {}, force=True) and only_forced.all_steps() == [5]
  only_forced.close()
  with pytest.raises(CheckpointError, match="save_every=0: must be an int >= 1 or None"):
    Checkpointer(tmp_path / "x", save_every=0, keep=1)


def test_refuses_to_overwrite_a_step_of_another_run(tmp_path):
  state = {"w": jnp.zeros(3)}
  first = Checkpointer(tmp_path, save_every=1, keep=None)
  first.maybe_save(4, state, {})
  first.close()
  second = Checkpointer(tmp_path, save_every=1, keep=None)
  with pytest.raises(CheckpointError, match="step 4 already exists"):
    second.maybe_save(4, state, {})
  second.restore(state)  # a restored step is known: skip
  assert not second.maybe_save(4, state, {})
  second.close()


def test_host_state_must_be_json(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None)
  with pytest.raises(CheckpointError, match="host_state/stats: key 0 \\(int\\) must be a str"):
    ckpt.maybe_save(1, {"w": jnp.zeros(2)}, {"stats": {0: [1.0]}})
  with pytest.raises(CheckpointError, match="host_state/x: object is not JSON"):
    ckpt.maybe_save(1, {"w": jnp.zeros(2)}, {"x": object()})
  assert ckpt.all_steps() == []
  ckpt.maybe_save(1, {"w": jnp.zeros(2)}, {"x": np.float32(0.5), "y": np.arange(2)})
  assert ckpt.restore({"w": jnp.zeros(2)})[1] == {"x": 0.5, "y": [0, 1]}
  ckpt.close()


# --------------------------------------------------------------------------- preemption
def test_sigterm_sets_flag_and_next_maybe_save_saves(tmp_path):
  original = signal.getsignal(signal.SIGTERM)
  ckpt = Checkpointer(tmp_path, save_every=100, keep=None)
  try:
    ckpt.install_preemption_handler()
    assert not ckpt.preemption_requested
    assert not ckpt.maybe_save(3, {"w": jnp.ones(2)}, {})
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not ckpt.preemption_requested and time.time() < deadline:
      time.sleep(0.01)
    assert ckpt.preemption_requested
    assert ckpt.maybe_save(3, {"w": jnp.ones(2)}, {"pos": 3})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3]
  finally:
    ckpt.close()  # also restores the handler
    signal.signal(signal.SIGTERM, original)
  assert signal.getsignal(signal.SIGTERM) == original


# --------------------------------------------------------------------------- damage
def _saved(tmp_path, steps=(5,)):
  state = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "step": jnp.int32(1)}
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None, metadata={"m": 1})
  for s in steps:
    ckpt.maybe_save(s, state, {"s": s})
  ckpt.close()
  return state


def test_half_written_save_is_ignored_and_garbage_step_is_an_error(tmp_path):
  state = _saved(tmp_path)
  tmp = tmp_path / "7.orbax-checkpoint-tmp-1700000000"  # an interrupted save
  (tmp / "train_state").mkdir(parents=True)
  (tmp / "train_state" / "junk").write_bytes(b"\x00garbage")
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None, metadata={"m": 1})
  assert ckpt.latest_step() == 5
  restored, host = ckpt.restore(state)
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert host == {"s": 5} and tmp.exists()
  ckpt.close()

  (tmp_path / "8").mkdir()  # not from Orbax
  (tmp_path / "8" / "junk").write_text("garbage")
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None, metadata={"m": 1})
  assert ckpt.latest_step() == 8
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(state)
  msg = str(info.value)
  assert f"{tmp_path}/8 (step 8) is incomplete" in msg and "Other steps" in msg
  assert "[5]" in msg and "Nothing was deleted" in msg
  assert (tmp_path / "8" / "junk").exists() and tmp.exists()
  assert ckpt.restore(state, step=5)[1] == {"s": 5}
  ckpt.close()


@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncate", ["cannot be read", "truncated or corrupt"]),
        ("no_array_metadata", ["is incomplete"]),
        ("no_metadata_item", ["cannot be read"]),
        ("no_host_state", ["cannot be read"]),
    ],
)
def test_corrupt_checkpoint_raises(tmp_path, damage, words):
  state = _saved(tmp_path, steps=(4, 5))
  step_dir = tmp_path / "5"
  if damage == "truncate":
    files = glob.glob(str(step_dir / "train_state" / "**" / "d" / "*"), recursive=True)
    assert files
    for f in files:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif damage == "no_array_metadata":
    os.remove(step_dir / "train_state" / "_METADATA")
  elif damage == "no_metadata_item":
    for f in glob.glob(str(step_dir / "metadata" / "*")):
      os.remove(f)
  else:
    os.remove(step_dir / "host_state" / "metadata")
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None, metadata={"m": 1})
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(state)
  msg = str(info.value)
  assert "(step 5)" in msg and str(tmp_path) in msg and "[4]" in msg
  for word in words:
    assert word in msg
  assert ckpt.restore(state, step=4)[1] == {"s": 4}  # the older one is fine
  ckpt.close()


# --------------------------------------------------------------------------- mismatch
def test_incompatible_tree_shape_dtype_raise(tmp_path, mesh, state):
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None)
  ckpt.maybe_save(1, state, {})
  ckpt.wait_until_finished()
  with pytest.raises(
      CheckpointError,
      match=r"incompatible.*params/l1/kernel shape \(16, 64\) "
      r"in checkpoint, \(16, 32\) in the train state",
  ):
    ckpt.restore(abstract_state(mesh, hidden=32))
  with pytest.raises(
      CheckpointError,
      match=r"params/l1/kernel dtype float32 in checkpoint, " r"bfloat16 in the train state",
  ):
    ckpt.restore(abstract_state(mesh, dtype=jnp.bfloat16))
  sgd_state = TrainState(
      state.params, optax.sgd(0.1, momentum=0.9).init(state.params), state.step, state.key
  )
  with pytest.raises(
      CheckpointError,
      match=r"missing in checkpoint: \['opt_state/0/trace/"
      r".*not in the train state: \['opt_state/0/count'",
  ):
    ckpt.restore(abstract_like(sgd_state))
  no_key = {
      "params": state.params,
      "opt_state": state.opt_state,
      "step": state.step,
      "key": jax.random.key_data(state.key),
  }
  with pytest.raises(CheckpointError, match="typed PRNG keys at \\['key'\\].*at \\[\\]"):
    ckpt.restore(abstract_like(no_key))
  ckpt.close()


def test_metadata_mismatch_raises_and_operational_config_only_warns(tmp_path, caplog):
  model = tmp_path / "base_model"
  model.mkdir()
  (model / "model.safetensors").write_bytes(b"weights-v1")
  config = {"lr": 1e-3, "num_rounds": 10, "log": {"image_every": 5}}
  meta = run_metadata("experiments.x", config, base_model=frozen_model_metadata(model))
  state = {"w": jnp.ones(3)}
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=None, metadata=meta)
  ckpt.maybe_save(1, state, {})
  ckpt.close()

  # resume, longer run, other logging interval: operational, only a warning
  longer = run_metadata(
      "experiments.x",
      {"lr": 1e-3, "num_rounds": 20, "log": {"image_every": 1}},
      base_model=meta["base_model"],
  )
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=None, metadata=longer)
  with caplog.at_level(logging.WARNING, logger="alignjax.checkpoint"):
    ckpt.restore(state)
  assert "config.num_rounds: checkpoint 10, now 20" in caplog.text
  assert "config.log.image_every: checkpoint 5, now 1" in caplog.text
  ckpt.close()

  # another learning rate and another script: refused, naming the key / the scripts
  other_lr = run_metadata("experiments.x", dict(config, lr=1.0), base_model=meta["base_model"])
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=None, metadata=other_lr)
  with pytest.raises(CheckpointError, match=r"another run: 1 setting.*config.lr: checkpoint 0.001"):
    ckpt.restore(state)
  ckpt.close()
  other_script = run_metadata("experiments.y", config, base_model=meta["base_model"])
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=None, metadata=other_script)
  with pytest.raises(
      CheckpointError, match="written by experiments.x, but this run is experiments.y"
  ):
    ckpt.restore(state)
  ckpt.close()

  (model / "model.safetensors").write_bytes(b"weights-v2")  # base model changed
  changed = dict(meta, base_model=frozen_model_metadata(model))
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=None, metadata=changed)
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(state)
  msg = str(info.value)
  assert "base_model.hash: checkpoint" in msg
  assert meta["base_model"]["hash"] in msg and changed["base_model"]["hash"] in msg
  assert "(step 1)" in msg
  ckpt.close()


def test_content_hash(tmp_path):
  f = tmp_path / "a.bin"
  f.write_bytes(b"hello")
  assert content_hash(f) == "sha256:" + hashlib.sha256(b"hello").hexdigest()
  d = tmp_path / "model"
  (d / "sub").mkdir(parents=True)
  (d / "config.json").write_text("{}")
  (d / "sub" / "w.bin").write_bytes(b"abc")
  expected = hashlib.sha256(
      (
          "config.json\0" + hashlib.sha256(b"{}").hexdigest() + "\n"
          "sub/w.bin\0" + hashlib.sha256(b"abc").hexdigest() + "\n"
      ).encode()
  ).hexdigest()
  assert content_hash(d) == "sha256:" + expected
  (d / "sub" / "w.bin").rename(d / "sub" / "v.bin")
  assert content_hash(d) != "sha256:" + expected
  assert frozen_model_metadata(d) == {"path": str(d), "hash": content_hash(d)}
  with pytest.raises(FileNotFoundError):
    content_hash(tmp_path / "nope")


# --------------------------------------------------------------------------- two processes
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp, numpy as np
    from alignjax import parallel
    from alignjax.checkpoint import Checkpointer, abstract_like

    pid, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    parallel.initialize_distributed({"distributed": {
        "enabled": True, "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
        "process_id": pid, "initialization_timeout": 60}})
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2})
    init = lambda: {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32),
                    "key": jax.random.key(7), "step": jnp.int32(3)}
    state = parallel.sharded_init(init, mesh, None)
    ckpt = Checkpointer(directory, save_every=100, keep=None, metadata={"base": "x"})
    assert ckpt.maybe_save(1, state, {"pid": pid}, force=True)
    if pid == 1:                      # only process 1 is told to stop
        ckpt.install_preemption_handler()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 30
        while not ckpt.preemption_requested and time.time() < deadline:
            time.sleep(0.01)
    saved = ckpt.maybe_save(2, state, {"pid": pid})      # both must agree to save
    restored, host = ckpt.restore(abstract_like(state), step=1)
    same = bool(jnp.all(restored["w"] == state["w"]))
    same = same and restored["w"].sharding == state["w"].sharding
    key = np.asarray(jax.random.key_data(restored["key"]).addressable_data(0)).tolist()
    print("RESULT " + json.dumps({"host": host, "same": same, "saved": saved, "key": key,
                                  "steps": ckpt.all_steps()}), flush=True)
    ckpt.close()
    jax.distributed.shutdown()
""")


def test_two_processes_save_restore_and_agree_on_preemption(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  port = testing.free_port()
  results = testing.run_local_processes(
      script, [(i, port, tmp_path / "ckpt") for i in range(2)], pythonpath=REPO
  )
  for r in results:  # process 0's host_state is the one saved; arrays from both
    assert r == {"host": {"pid": 0}, "same": True, "saved": True, "key": [0, 7], "steps": [1, 2]}
  shards = glob.glob(str(tmp_path / "ckpt" / "1" / "train_state" / "ocdbt.process_*"))
  assert len(shards) == 2
