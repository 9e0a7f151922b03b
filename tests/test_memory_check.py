"""alignjax.parallel's pre-compile memory check: per-device bytes of a sharded tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import parallel


def test_bytes_per_device_counts_each_devices_shards():
  mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1))
  tree = {
      "w": jax.ShapeDtypeStruct((4096, 512), jnp.float32),  # fsdp over 4: 1024 x 512 each
      "b": jax.ShapeDtypeStruct((512,), jnp.bfloat16),  # small: replicated
  }
  shardings = parallel.param_shardings(tree, mesh)
  want = 1024 * 512 * 4 + 512 * 2
  assert parallel.bytes_per_device(tree, shardings) == want
  replicated = jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), tree)
  assert parallel.bytes_per_device(tree, replicated) == 4096 * 512 * 4 + 512 * 2


def test_a_state_larger_than_the_device_is_refused_before_compiling():
  mesh = parallel.make_mesh(dict(data=8, fsdp=1, tensor=1))
  tree = {"w": jax.ShapeDtypeStruct((1 << 20,), jnp.float32)}  # 4 MiB on every device
  shardings = parallel.param_shardings(tree, mesh)
  assert parallel.check_fits_in_memory("state", tree, shardings, limit=1 << 23) == 1 << 22
  with pytest.raises(parallel.ShardingError, match=r"state needs 0.00 GB.*mesh.fsdp"):
    parallel.check_fits_in_memory("state", tree, shardings, limit=1 << 21)


def test_the_cpu_reports_no_limit_so_nothing_is_refused():
  assert parallel.device_memory_limit(jax.devices("cpu")[0]) is None
  tree = {"w": np.zeros((1 << 10,), np.float32)}
  mesh = parallel.make_mesh(dict(data=8, fsdp=1, tensor=1))
  assert parallel.check_fits_in_memory("state", tree, parallel.param_shardings(tree, mesh)) == 4096


def test_prng_keys_count_their_key_data():
  mesh = parallel.make_mesh(dict(data=8, fsdp=1, tensor=1))
  tree = {"key": jax.random.key(0)}
  assert parallel.bytes_per_device(tree, parallel.param_shardings(tree, mesh)) == 8
