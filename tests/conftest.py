"""Test-session setup: 8 fake CPU devices, float32 matmuls at full precision."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
# Threefry's partitionable mode compiles each new random shape slowly on CPU (seconds); the
# classic mode draws the same kind of numbers and compiles ~10x faster. Results never depend
# on sharding in either mode.
jax.config.update("jax_threefry_partitionable", False)
