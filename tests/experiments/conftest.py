"""Experiment tests run whole scripts several times over (resume, sharded, multi-process).
Each module here compiles through the run's persistent XLA compilation cache (tests/conftest.py,
shared by the workers), with no minimum compile time, and shares it with the scripts' subprocesses (through the JAX_* environment), so that a program
compiles once, not once per run. A cache hit loads the same executable: results are
unchanged."""

import os

import pytest

from experiments import common


@pytest.fixture(autouse=True, scope="module")
def _persistent_compilation_cache(_shared_compilation_cache):
  cache_env = {**_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR": _shared_compilation_cache}
  saved = {k: os.environ.get(k) for k in cache_env}
  os.environ.update(cache_env)
  with common.persistent_compilation_cache(_shared_compilation_cache):
    yield
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
