"""One run per workdir: checks the directory and holds an exclusive lock on it for the run.

`exclusive(workdir)` is a context manager that every experiment script enters right after
validating its config, before it compiles or writes anything:

  1. an empty `--workdir` or one that cannot be created or written to is a WorkdirError
     naming the flag and the reason;
  2. process 0 takes an exclusive `fcntl.flock` on `<workdir>/run.lock` and writes its pid,
     host and start time into it. A second run in the same workdir gets WorkdirError at once,
     naming the holder's pid and host. The lock is released when the context exits and by the
     operating system when the process dies (a crash leaves no stale lock: the file stays, the
     lock does not);
  3. in a multi-host job the other processes take no lock; they learn from process 0 (one
     broadcast) whether it holds the lock, and fail with the same message if it does not.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import tempfile

import jax
import numpy as np

LOCK_NAME = "run.lock"


class WorkdirError(RuntimeError):
  """The workdir cannot be used: empty, not writable, or held by another run."""


def check_writable(workdir: str, flag: str = "--workdir") -> str:
  """Creates `workdir` if needed and checks that files can be written there; absolute path."""
  if workdir is None or not str(workdir).strip():
    raise WorkdirError(f"{flag} is empty: give the directory for checkpoints, logs and images")
  path = os.path.abspath(os.fspath(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{flag}={workdir}: exists and is not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"{flag}={workdir}: cannot create the directory ({e.strerror})") from e
  try:
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise WorkdirError(f"{flag}={workdir}: the directory is not writable ({e.strerror})") from e
  return path


def _holder(lock_path: str) -> str:
  try:
    with open(lock_path) as f:
      text = f.read().strip()
  except OSError:
    text = ""
  return text or "an unknown process"


class _Lock:

  def __init__(self, path: str):
    self.path = path
    self._fd: int | None = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise WorkdirError(
            f"workdir {os.path.dirname(self.path)} is in use by another run ({_holder(self.path)}); "
            "wait for it to finish, stop it, or choose another --workdir"
        ) from None
      raise WorkdirError(f"cannot lock {self.path}: {e.strerror}") from e
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode())
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _agree_across_processes(error: str | None) -> str | None:
  """Process 0's error (or None) on every process: one broadcast of a small byte array."""
  if jax.process_count() == 1:
    return error
  from jax.experimental import multihost_utils

  size = 1024
  data = np.zeros(size, np.uint8)
  if error is not None:
    raw = error.encode()[: size - 1]
    data[: len(raw)] = np.frombuffer(raw, np.uint8)
    data[size - 1] = 1
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  if not data[size - 1]:
    return None
  return bytes(data[: size - 1]).rstrip(b"\0").decode(errors="replace")


@contextlib.contextmanager
def exclusive(workdir: str, flag: str = "--workdir", *, this_process_only: bool = False):
  """Checks `workdir` and holds its lock for the duration (see the module docstring).

  Yields the absolute path. Raises WorkdirError on every process when the directory is
  unusable or another run holds it. `this_process_only=True`: the calling process takes the
  lock itself and no other process takes part (for work that one process does alone, such
  as filling a cache).
  """
  lock, error = None, None
  if this_process_only or jax.process_index() == 0:
    try:
      path = check_writable(workdir, flag)
      lock = _Lock(os.path.join(path, LOCK_NAME))
      lock.acquire()
    except WorkdirError as e:
      lock, error = None, str(e)
  if not this_process_only:
    error = _agree_across_processes(error)
  if error is not None:
    raise WorkdirError(error)
  path = os.path.abspath(os.fspath(workdir))
  if lock is None:
    os.makedirs(path, exist_ok=True)
  try:
    yield path
  finally:
    if lock is not None:
      lock.release()
