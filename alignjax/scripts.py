"""Experiment scripts that run both as modules and as files.

The scripts under `experiments/` import their own package (`from experiments import common`)
and so do some of their config files (`experiments.configs...`). Run as a module from the
checkout root,

    python -m experiments.ddpo --config=experiments/configs/ddpo/digits.py

the root is on `sys.path` and those imports resolve. Run as a file, from any directory,

    python /path/to/checkout/experiments/ddpo.py --config=/path/to/checkout/experiments/configs/ddpo/digits.py

Python puts only the script's own directory (`experiments/`) on `sys.path`, and the imports
fail with `ModuleNotFoundError: No module named 'experiments'`. Each script therefore calls,
before it imports its package,

    scripts.make_importable(__file__, __package__)

which does nothing when the script was imported or run with `-m` (`__package__` is set), and
otherwise makes the file run as `python -m` would from the checkout root.

`exit_on_run_errors()` wraps a script's run: alignjax's own run errors (a bad config value, an
unusable or busy workdir, a damaged or another run's checkpoint, non-finite training values)
already say what went wrong and what to do, so the command line prints just that message and
exits with status 1, without a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys

__all__ = ["exit_on_run_errors", "make_importable", "package_root", "run_errors"]


def package_root(file: str) -> str:
  """The directory that holds the top-level package of the module `file`: the parent of the
  highest directory above `file` reached through an unbroken chain of `__init__.py` packages
  (for experiments/tables/tilt_error.py, the directory that holds experiments/). A module
  outside any package gives its own directory."""
  directory = os.path.dirname(os.path.realpath(file))
  while os.path.isfile(os.path.join(directory, "__init__.py")):
    parent = os.path.dirname(directory)
    if parent == directory:
      break
    directory = parent
  return directory


def make_importable(file: str, package: str | None) -> str | None:
  """Lets a script run as a file import the package it belongs to.

  Call it as `make_importable(__file__, __package__)` near the top of the script, before the
  script's first import of its own package. When `package` is set (the script was imported,
  or run with `python -m`) it changes nothing and returns None. Otherwise (run as a file) it
  puts `package_root(file)` first on `sys.path`, in place of the script's own directory that
  Python put there (so that the script's sibling modules are not also importable under a
  second, top-level name), and returns that root. The config files the script loads then
  import the same package too.
  """
  if package:
    return None
  root = package_root(file)
  script_dir = os.path.dirname(os.path.realpath(file))

  def resolved(entry: str) -> str:
    return os.path.realpath(entry or os.curdir)

  sys.path[:] = [p for p in sys.path if resolved(p) not in (root, script_dir)]
  sys.path.insert(0, root)
  return root


def run_errors() -> tuple[type[Exception], ...]:
  """The exception types whose messages are complete for a user (see the module docstring)."""
  from alignjax import checkpoint, configs, finite, workdir

  return (
      configs.ConfigError,
      checkpoint.CheckpointError,
      finite.NonFiniteError,
      workdir.WorkdirError,
  )


@contextlib.contextmanager
def exit_on_run_errors():
  """Prints "FATAL <Error>: <message>" and exits with status 1 on a `run_errors()` error."""
  try:
    yield
  except run_errors() as error:
    sys.stderr.write(f"FATAL {type(error).__name__}: {error}\n")
    sys.exit(1)
