"""Experiment tests run whole scripts several times over (resume, sharded, multi-process).
Each module here compiles through one persistent XLA compilation cache per test worker,
shared with the scripts' subprocesses (through the JAX_* environment), so that a program
compiles once, not once per run. A cache hit loads the same executable: results are
unchanged."""

import atexit
import os
import shutil
import tempfile

import pytest

from experiments import common

_CACHE_DIR = tempfile.mkdtemp(prefix="alignjax-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _persistent_compilation_cache():
  saved = {k: os.environ.get(k) for k in _CACHE_ENV}
  os.environ.update(_CACHE_ENV)
  with common.persistent_compilation_cache(_CACHE_DIR):
    yield
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": _CACHE_DIR,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
