"""Tests for alignjax.parallel on 8 fake CPU devices, plus a 2-process gloo run."""

import logging
import os
import textwrap

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alignjax import parallel, testing
from alignjax.configs import ConfigError
from alignjax.training import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MLP(nnx.Module):

  def __init__(self, din=8, hidden=64, dout=4, *, rngs):
    self.l1 = nnx.Linear(din, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def mlp_init(seed=0):
  return nnx.split(MLP(rngs=nnx.Rngs(seed)))


def abstract(**shapes):
  return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


# --------------------------------------------------------------------------- mesh
@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"data": -1}, (8, 1, 1)),
        ({"data": -1, "fsdp": 2}, (4, 2, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": 1, "fsdp": 8, "tensor": 1}, (1, 8, 1)),
    ],
)
def test_make_mesh_shapes(cfg, expected):
  mesh = parallel.make_mesh(cfg)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape[a] for a in mesh.axis_names) == expected
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_given_devices():
  mesh = parallel.make_mesh({"data": -1}, devices=jax.devices()[:2])
  assert mesh.shape["data"] == 2 and mesh.devices.size == 2


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"data": 3}, ["data=3", "3 devices", "8 devices"]),
        ({"data": -1, "fsdp": 3}, ["fsdp=3", "8 devices", "not divisible by 3"]),
        ({"data": -1, "fsdp": -1}, ["at most one axis may be -1"]),
        ({"batch": 2}, ["unknown axis 'batch'", "data, fsdp, tensor"]),
        ({"data": 0}, ["config.mesh.data=0", "-1"]),
        ({"data": 16}, ["16 devices", "8 devices"]),
    ],
)
def test_make_mesh_bad_shapes(cfg, words):
  with pytest.raises(ConfigError) as info:
    parallel.make_mesh(cfg)
  for word in words:
    assert word in str(info.value)


# --------------------------------------------------------------------------- rules
def test_path_strings_drop_nnx_value_and_cover_optax():
  _, params = mlp_init()
  paths = [p for p, _ in parallel.flatten_with_paths(params)[0]]
  assert paths == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]
  opt_paths = [p for p, _ in parallel.flatten_with_paths(optax.adam(1e-3).init(params))[0]]
  assert "0/count" in opt_paths and "0/mu/l1/kernel" in opt_paths


def test_one_path_helper_for_key_paths_flat_states_and_train_states():
  _, params = mlp_init()
  flat = [parallel.path_str(p, sep=".") for p, _ in nnx.to_flat_state(params)]
  assert flat == ["l1.bias", "l1.kernel", "l2.bias", "l2.kernel"]
  assert parallel.path_str(("layers", 0, "kernel")) == "layers/0/kernel"
  state = TrainState.create(params, optax.adamw(1e-3), jax.random.key(0))
  paths = [p for p, _ in parallel.flatten_with_paths(state)[0]]
  assert "params/l1/kernel" in paths and "opt_state/0/mu/l1/kernel" in paths
  assert "opt_state/0/nu/l2/bias" in paths and "step" in paths and "key" in paths


def test_suffix_rules_shard_params_and_adam_moments_alike():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params = nnx.split(MLP(din=32, hidden=128, dout=8, rngs=nnx.Rngs(0)))[1]
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = jax.eval_shape(lambda p: TrainState.create(p, optimizer, jax.random.key(0)), params)
  rules = [(r"(^|/)l1/kernel$", ("fsdp", "tensor")), (r"(^|/)l2/kernel$", ("tensor",))]
  specs = {
      p: s.spec
      for p, s in parallel.flatten_with_paths(parallel.param_shardings(state, mesh, rules))[0]
  }
  for prefix in ("params/", "opt_state/1/0/mu/", "opt_state/1/0/nu/"):
    assert specs[prefix + "l1/kernel"] == P("fsdp", "tensor")
    assert specs[prefix + "l2/kernel"] == P("tensor")
    assert specs[prefix + "l1/bias"] == P()
  assert specs["opt_state/1/0/count"] == P() and specs["step"] == P()
  # An anchored rule would silently match nothing inside a TrainState: hence suffix rules.
  anchored = parallel.param_shardings(state, mesh, [(r"^l1/kernel$", ("fsdp",))])
  assert all(s.spec == P() for s in jax.tree.leaves(anchored))


def test_indivisible_policy_replicates_only_that_dimension_and_logs(caplog):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  tree = {"k": abstract(kernel=(64, 2, 8)), "q": abstract(kernel=(64, 8, 8))}
  rule = parallel.Rule(r"kernel$", ("fsdp", "tensor"), "replicate")
  with caplog.at_level(logging.INFO, logger="alignjax.parallel"):
    sh = parallel.param_shardings(tree, mesh, [rule])
  assert sh["k"]["kernel"].spec == P("fsdp", None) and sh["q"]["kernel"].spec == P("fsdp", "tensor")
  assert "replicated 1 dimension(s)" in caplog.text
  assert (
      "'k/kernel' (shape (64, 2, 8)) dimension 1 of size 2 over mesh axis 'tensor'" in caplog.text
  )
  # spec_for on its own logs each fallback; the default policy raises
  assert parallel.spec_for("k/kernel", (64, 2, 8), mesh, [tuple(rule)]) == P("fsdp", None)
  with pytest.raises(
      parallel.ShardingError, match="dimension 1 of size 2.*indivisible='replicate'"
  ):
    parallel.spec_for("k/kernel", (64, 2, 8), mesh, [rule[:2]])
  # bad rules name the problem and the choices
  with pytest.raises(ConfigError, match="indivisible='pad'; valid choices: raise, replicate"):
    parallel.param_shardings(tree, mesh, [(r"kernel$", ("fsdp",), "pad")])
  with pytest.raises(ConfigError, match="expected \\(pattern, spec\\)"):
    parallel.param_shardings(tree, mesh, [(r"kernel$",)])
  with pytest.raises(ConfigError, match="not a valid regex"):
    parallel.param_shardings(tree, mesh, [(r"kernel(", ("fsdp",))])
  with pytest.raises(ConfigError, match="uses a mesh axis twice"):
    parallel.param_shardings(tree, mesh, [(r"kernel$", ("fsdp", ("fsdp", "tensor")), "replicate")])


def test_put_on_mesh_and_batch_divisibility():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tree = {"w": np.arange(64.0).reshape(8, 8), "b": jnp.ones(8)}
  placed = parallel.put_on_mesh(tree, mesh, [("w", ("fsdp", "tensor"))])
  assert placed["w"].sharding.spec == P("fsdp", "tensor") and placed["b"].sharding.spec == P()
  np.testing.assert_array_equal(placed["w"], tree["w"])
  again = parallel.put_on_mesh(placed, mesh, [("w", ("tensor",))])  # already on the mesh: kept
  assert again["w"] is placed["w"]
  parallel.check_batch_divisible(8, mesh, "f")
  with pytest.raises(ConfigError, match="f: batch size 6 is not divisible by .*data\\*fsdp=4"):
    parallel.check_batch_divisible(6, mesh, "f")


def test_rule_matching_first_match_wins():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tree = {
      "embed": abstract(table=(128, 16)),
      "dense": abstract(kernel=(64, 32), bias=(32,)),
      "head": abstract(kernel=(32, 10)),
  }
  rules = [
      ("embed/table", P(None, "tensor")),
      ("head/kernel", "replicate"),
      ("kernel$", ("fsdp", "tensor")),
      ("dense", (("data", "fsdp"),)),
  ]
  sh = parallel.param_shardings(tree, mesh, rules)
  assert sh["embed"]["table"].spec == P(None, "tensor")
  assert sh["head"]["kernel"].spec == P()
  assert sh["dense"]["kernel"].spec == P("fsdp", "tensor")
  assert sh["dense"]["bias"].spec == P(("data", "fsdp"))
  assert parallel.data_parallel_size(mesh) == 4
  # a leaf matched by no rule is replicated
  assert parallel.param_shardings(tree, mesh, [("nothing", ("fsdp",))])["dense"]["bias"].spec == P()
  for s in jax.tree.leaves(sh):
    assert s.mesh is mesh


@pytest.mark.parametrize(
    "shape, fsdp, expected",
    [
        ((64, 48), 4, P("fsdp")),  # largest divisible dimension
        ((48, 64), 4, P(None, "fsdp")),
        ((32, 32), 4, P(None, "fsdp")),  # tie: the later dimension
        ((66, 64), 4, P(None, "fsdp")),  # 66 is larger but not divisible by 4
        ((3, 5, 77), 4, P()),  # nothing divisible: replicate
        ((16, 16), 4, P()),  # 256 < 2**10 elements: replicate
        ((2048,), 8, P("fsdp")),
        ((), 4, P()),
        ((64, 64), 1, P()),  # no fsdp axis to speak of
    ],
)
def test_default_fsdp_tactic(shape, fsdp, expected):
  mesh = parallel.make_mesh({"data": -1, "fsdp": fsdp})
  sh = parallel.param_shardings(abstract(w=shape), mesh, None)
  assert sh["w"].spec == expected


def test_divisibility_error_names_path_shape_and_axis():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  tree = {"block": abstract(kernel=(6, 64))}
  with pytest.raises(parallel.ShardingError) as info:
    parallel.param_shardings(tree, mesh, [("kernel", ("fsdp", None))])
  msg = str(info.value)
  assert "'block/kernel'" in msg and "(6, 64)" in msg and "'fsdp'" in msg and "size 4" in msg
  with pytest.raises(ConfigError, match="'model'.*valid axes: data, fsdp, tensor"):
    parallel.param_shardings(tree, mesh, [("kernel", (None, "model"))])
  with pytest.raises(ConfigError, match="3 entries but the leaf has shape"):
    parallel.param_shardings(tree, mesh, [("kernel", (None, None, "fsdp"))])
  with pytest.raises(ConfigError, match="unknown tactic 'shard'"):
    parallel.param_shardings(tree, mesh, [("kernel", "shard")])


# --------------------------------------------------------------------------- sharded init
def test_sharded_init_nnx_state_and_optax_state():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  graphdef, reference = mlp_init(seed=3)
  params = parallel.sharded_init(lambda: mlp_init(seed=3)[1], mesh, None)
  assert isinstance(params, nnx.State)
  specs = {p: leaf.sharding.spec for p, leaf in parallel.flatten_with_paths(params)[0]}
  # l1/kernel (8, 64): 512 elements -> replicated; l2/kernel (64, 4): 256 -> replicated
  assert specs == {"l1/bias": P(), "l1/kernel": P(), "l2/bias": P(), "l2/kernel": P()}
  big = parallel.sharded_init(
      lambda: nnx.split(MLP(din=32, hidden=128, dout=8, rngs=nnx.Rngs(3)))[1], mesh, None
  )
  specs = {p: leaf.sharding.spec for p, leaf in parallel.flatten_with_paths(big)[0]}
  assert specs == {
      "l1/bias": P(),
      "l1/kernel": P(None, "fsdp"),
      "l2/bias": P(),
      "l2/kernel": P("fsdp"),
  }
  assert big["l1"]["kernel"].get_value().addressable_shards[0].data.shape == (32, 32)
  expected = nnx.split(MLP(din=32, hidden=128, dout=8, rngs=nnx.Rngs(3)))[1]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(big), expected)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), reference)
  assert parallel.describe_shardings(big).splitlines() == [
      "l1/bias (128,) P()",
      "l1/kernel (32, 128) P(None, 'fsdp')",
      "l2/bias (8,) P()",
      "l2/kernel (128, 8) P('fsdp',)",
  ]

  opt = optax.adam(1e-3)
  opt_state = parallel.sharded_init(opt.init, mesh, None, big)
  mu = opt_state[0].mu
  assert mu["l1"]["kernel"].get_value().sharding.spec == P(None, "fsdp")
  assert mu["l2"]["kernel"].get_value().sharding.spec == P("fsdp")
  assert opt_state[0].count.sharding.spec == P()
  assert parallel.tree_shardings(big)["l2"]["kernel"].get_value().spec == P("fsdp")


def test_sharded_init_with_explicit_rules_and_args():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  init = lambda key: {"w": jax.random.normal(key, (8, 6)), "b": jnp.zeros((6,))}
  tree = parallel.sharded_init(init, mesh, [("w", ("fsdp", "tensor"))], jax.random.key(1))
  assert tree["w"].sharding.spec == P("fsdp", "tensor") and tree["b"].sharding.spec == P()
  np.testing.assert_array_equal(tree["w"], init(jax.random.key(1))["w"])


# --------------------------------------------------------------------------- batches
def test_shard_batch_single_process():
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = parallel.shard_batch({"x": x, "y": np.arange(16)}, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(batch["x"], x)
  for shard in batch["x"].addressable_shards:
    rows = shard.index[0]
    assert rows.stop - rows.start == 2
    np.testing.assert_array_equal(shard.data, x[rows])
  with pytest.raises(ConfigError, match="'x'.*global batch 12.*data\\*fsdp=8"):
    parallel.shard_batch({"x": x[:12]}, mesh)
  with pytest.raises(ConfigError, match="scalar"):
    parallel.shard_batch({"t": np.float32(1.0)}, mesh)


def _sgd_run(mesh_cfg, devices, steps=3):
  mesh = parallel.make_mesh(mesh_cfg, devices=devices)
  graphdef, _ = nnx.split(MLP(din=32, hidden=128, dout=8, rngs=nnx.Rngs(0)))
  params = parallel.sharded_init(
      lambda: nnx.split(MLP(din=32, hidden=128, dout=8, rngs=nnx.Rngs(0)))[1], mesh, None
  )
  p_sh = parallel.tree_shardings(params)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 32)).astype(np.float32)
  y = rng.normal(size=(16, 8)).astype(np.float32)
  batch = parallel.shard_batch({"x": x, "y": y}, mesh)

  def loss_fn(p, b):
    return jnp.mean((nnx.merge(graphdef, p)(b["x"]) - b["y"]) ** 2)

  def step(p, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    return jax.tree.map(lambda w, g: w - 0.1 * g, p, grads), loss

  step = jax.jit(
      step,
      in_shardings=(p_sh, parallel.batch_sharding(mesh)),
      out_shardings=(p_sh, parallel.replicated(mesh)),
      donate_argnums=0,
  )
  losses = []
  for _ in range(steps):
    params, loss = step(params, batch)
    losses.append(float(loss))
  assert jax.tree.leaves(params)[1].sharding.spec == jax.tree.leaves(p_sh)[1].spec
  return jax.device_get(params), losses


def test_train_step_same_on_all_meshes():
  ref, ref_losses = _sgd_run({"data": 1}, jax.devices()[:1])
  for cfg in ({"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 4}):
    params, losses = _sgd_run(cfg, None)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref)
  assert ref_losses[-1] < ref_losses[0]


# --------------------------------------------------------------------------- multi-host
def test_initialize_distributed_noop_and_main_process():
  assert parallel.initialize_distributed({}) is False
  assert parallel.initialize_distributed({"distributed": {"enabled": False}}) is False
  config = ml_collections.ConfigDict({"distributed": {"enabled": False, "coordinator_address": ""}})
  assert parallel.initialize_distributed(config) is False
  assert not jax.distributed.is_initialized()
  assert parallel.is_main_process()


CHILD = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp, numpy as np
    from alignjax import parallel, testing

    pid, port = int(sys.argv[1]), int(sys.argv[2])
    config = {"distributed": {"enabled": True, "coordinator_address": f"127.0.0.1:{port}",
                              "num_processes": 2, "process_id": pid,
                              "initialization_timeout": 60}}
    assert parallel.initialize_distributed(config)
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    assert parallel.is_main_process() == (pid == 0)
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2})
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) / 10.0
    y = np.sin(np.arange(8, dtype=np.float32))[:, None]
    rows = slice(4 * pid, 4 * pid + 4)                        # this process's half
    batch = parallel.shard_batch({"x": x[rows], "y": y[rows]}, mesh)
    w = parallel.sharded_init(lambda: jnp.full((3, 1), 0.5), mesh, None)

    def step(w, b):
        loss, g = jax.value_and_grad(lambda w: jnp.mean((b["x"] @ w - b["y"]) ** 2))(w)
        return w - 0.1 * g, loss, jnp.sum(b["x"]), jnp.mean(b["y"])

    rep = parallel.replicated(mesh)
    out = jax.jit(step, out_shardings=(rep, rep, rep, rep))(w, batch)
    out = [np.asarray(o.addressable_data(0)).tolist() for o in out]
    print("RESULT " + json.dumps(out), flush=True)
    jax.distributed.shutdown()
""")


def test_two_processes_match_single_process(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  port = testing.free_port()
  results = testing.run_local_processes(script, [(i, port) for i in range(2)], pythonpath=REPO)
  assert results[0] == results[1]  # both processes agree
  # single-process reference, written out by hand: one SGD step of least squares
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) / 10.0
  y = np.sin(np.arange(8, dtype=np.float32))[:, None]
  w = np.full((3, 1), 0.5, np.float32)
  r = x @ w - y
  w_new = w - 0.1 * (2.0 / 8) * x.T @ r
  new_w, loss, xsum, ymean = results[0]
  np.testing.assert_allclose(new_w, w_new, rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(r**2), rtol=1e-5)
  np.testing.assert_allclose(xsum, x.sum(), rtol=1e-6)
  np.testing.assert_allclose(ymean, y.mean(), rtol=1e-5, atol=1e-7)
