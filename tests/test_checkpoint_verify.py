"""Verified checkpoints: device checksums (alignjax.checksums), bit flips, fallback, no NaN saves;
and the run identity rules (alignjax.run_identity)."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import checksums, parallel, run_identity, testing
from alignjax.checkpoint import CheckpointDamagedError, CheckpointError, Checkpointer


# --------------------------------------------------------------------------- checksums
def _numpy_checksum(x: np.ndarray) -> list[int]:
  """Eqs. 1-2 of alignjax.checksums, written independently with uint64 numpy arithmetic."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint64)
  else:
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
  words = words.reshape(-1)
  i = np.arange(words.size, dtype=np.uint64)
  weights = (i * 2654435761 + 1) % 2**32
  return [int(words.sum() % 2**32), int(((words * weights) % 2**32).sum() % 2**32)]


def test_checksums_equal_an_independent_formula_for_every_dtype():
  rng = np.random.default_rng(0)
  arrays = [
      rng.standard_normal((5, 7)).astype(np.float32),
      rng.standard_normal((3, 4, 2)).astype(jnp.bfloat16),
      rng.integers(-100, 100, (9,)).astype(np.int32),
      rng.integers(0, 255, (4, 4)).astype(np.uint8),
      rng.random((6,)) > 0.5,
      np.float32(3.5),
  ]
  sums, finite = checksums.tree_checksums_and_finite([jnp.asarray(a) for a in arrays])
  assert sums == [_numpy_checksum(a) for a in arrays]
  assert finite == [True] * len(arrays)


def test_checksums_catch_one_bit_and_a_swap_and_do_not_depend_on_sharding():
  x = np.arange(64, dtype=np.float32).reshape(8, 8)
  (base,), _ = checksums.tree_checksums_and_finite([x])
  flipped = x.copy()
  flipped.view(np.uint32)[3, 5] ^= 1 << 17
  swapped = x.copy()
  swapped[[0, 7]] = swapped[[7, 0]]
  (one_bit, swap), _ = checksums.tree_checksums_and_finite([flipped, swapped])
  assert one_bit[0] != base[0] and one_bit[1] != base[1]
  assert swap[0] == base[0] and swap[1] != base[1]  # same multiset, other positions
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  sharded = jax.device_put(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp"))
  )
  assert checksums.tree_checksums_and_finite([sharded])[0] == [base]


def test_finite_flags():
  _, finite = checksums.tree_checksums_and_finite(
      [jnp.array([1.0, jnp.inf]), jnp.array([jnp.nan]), jnp.ones(2), jnp.arange(3)]
  )
  assert finite == [False, False, True, True]


# --------------------------------------------------------------------------- checkpoints
STATE = {"params": {"w": jnp.arange(4096.0).reshape(64, 64)}, "step": jnp.int32(1)}


def _save(directory, steps, **kwargs):
  ckpt = Checkpointer(directory, save_every=1, keep=None, metadata={"m": 1}, **kwargs)
  for step in steps:
    ckpt.maybe_save(step, jax.tree.map(lambda x: x + step, STATE), {"s": step})
  ckpt.close()


def _tree(directory):
  return sorted(os.path.relpath(p, directory) for p in glob.glob(f"{directory}/**", recursive=True))


def test_a_bit_flipped_array_file_is_an_error_naming_the_step(tmp_path):
  _save(tmp_path, (4, 5))
  testing.flip_saved_array_bytes(tmp_path / "5")
  before = _tree(tmp_path)
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None, metadata={"m": 1})
  with pytest.raises(CheckpointDamagedError) as info:
    ckpt.restore(STATE)
  msg = str(info.value)
  assert f"{tmp_path}/5 (step 5)" in msg and "Nothing was deleted" in msg
  assert "do not match the checksums" in msg and "params/w" in msg
  restored, host = ckpt.restore(STATE, step=4)  # the older step is intact and untouched
  np.testing.assert_array_equal(restored["params"]["w"], STATE["params"]["w"] + 4)
  assert host == {"s": 4}
  ckpt.close()
  assert _tree(tmp_path) == before


def test_fallback_restores_the_newest_intact_step_and_keeps_the_damaged_one(tmp_path, caplog):
  _save(tmp_path, (3, 4, 5))
  testing.flip_saved_array_bytes(tmp_path / "5")
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None, metadata={"m": 1}, on_damage="fallback")
  with caplog.at_level(logging.WARNING, logger="alignjax.checkpoint"):
    restored, host = ckpt.restore(STATE)
  assert host == {"s": 4} and "step(s) [5] are damaged" in caplog.text
  np.testing.assert_array_equal(restored["params"]["w"], STATE["params"]["w"] + 4)
  assert ckpt.all_steps() == [3, 4] and (tmp_path / "5.damaged" / "train_state").is_dir()
  assert ckpt.maybe_save(5, STATE, {"s": 5})  # the run saves step 5 again
  ckpt.close()
  assert Checkpointer(tmp_path, save_every=1, keep=None).all_steps() == [3, 4, 5]


def test_tampered_host_state_is_detected(tmp_path):
  _save(tmp_path, (2,))
  files = glob.glob(str(tmp_path / "2" / "host_state" / "*"))
  for name in files:
    with open(name) as f:
      text = f.read()
    if '"s": 2' in text:
      with open(name, "w") as f:
        f.write(text.replace('"s": 2', '"s": 7'))
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None, metadata={"m": 1})
  with pytest.raises(CheckpointDamagedError, match="host_state does not match the sha256"):
    ckpt.restore(STATE)
  ckpt.close()


def test_non_finite_state_is_never_saved(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=1, keep=None)
  bad = {"params": {"w": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)}, "step": jnp.int32(1)}
  with pytest.raises(CheckpointError, match=r"refusing to save step 1 .*non-finite.*params/w"):
    ckpt.maybe_save(1, bad, {})
  ckpt.close()
  assert Checkpointer(tmp_path, save_every=1, keep=None).all_steps() == []


# --------------------------------------------------------------------------- run identity
def test_operational_keys_are_exactly_the_listed_ones():
  allowed = [
      "num_rounds",
      "num_updates",
      "num_iterations",
      "checkpoint.every",
      "checkpoint.keep",
      "log.image_every",
      "mesh.data",
      "distributed.num_processes",
      "compiler_options",
      "compiler_options.xla_backend_optimization_level",
      "finite.policy",
      "model.cache_dir",
  ]
  refused = [
      "seed",
      "reward.name",
      "reward.target",
      "model.init",
      "finetune.mode",
      "optimizer.learning_rate",
      "sampling.batch_size",
      "ddpo.clip_range",
      "eval.seed",
      "eval.num_samples",
      "draft.variant",
      "am.lam",
      "checkpointx",
      "model.random_preset",
  ]
  assert all(run_identity.is_operational(k) for k in allowed)
  assert not any(run_identity.is_operational(k) for k in refused)


def test_compare_splits_refused_and_allowed_differences():
  stored = run_identity.run_metadata(
      "experiments.ddpo", {"seed": 0, "num_rounds": 2, "mesh": {"data": 8}}
  )
  current = run_identity.run_metadata(
      "experiments.ddpo", {"seed": 1, "num_rounds": 4, "mesh": {"data": 4}}
  )
  refused, allowed = run_identity.compare(stored, current)
  assert refused == ["config.seed: checkpoint 0, now 1"]
  assert allowed == [
      "config.mesh.data: checkpoint 8, now 4",
      "config.num_rounds: checkpoint 2, now 4",
  ]
