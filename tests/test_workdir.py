"""alignjax.workdir: workdir checks and the one-run-per-workdir lock (across processes too)."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from alignjax import testing
from alignjax import workdir as workdir_lib

HOLD = textwrap.dedent("""
    import sys, time
    from alignjax import workdir
    with workdir.exclusive(sys.argv[1]):
      print("locked", flush=True)
      sys.stdin.readline()  # hold the lock until the parent writes a line
    """)


def test_empty_and_impossible_workdirs_are_named(tmp_path):
  for empty in ("", "   ", None):
    with pytest.raises(workdir_lib.WorkdirError, match="--workdir is empty"):
      workdir_lib.check_writable(empty)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match=r"--workdir=.*a_file/run: cannot create"):
    workdir_lib.check_writable(str(blocker / "run"))
  with pytest.raises(workdir_lib.WorkdirError, match="exists and is not a directory"):
    workdir_lib.check_writable(str(blocker))
  assert workdir_lib.check_writable(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")


def test_second_holder_is_refused_naming_pid_and_host_and_the_lock_is_released(tmp_path):
  with workdir_lib.exclusive(str(tmp_path)) as path:
    assert path == str(tmp_path)
    with pytest.raises(workdir_lib.WorkdirError) as info:
      with workdir_lib.exclusive(str(tmp_path)):
        pass
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(info.value)
    assert "is in use by another run" in str(info.value)
  with workdir_lib.exclusive(str(tmp_path)):  # released on exit
    pass


def test_lock_held_by_another_process_and_released_when_it_dies(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", HOLD, str(tmp_path)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError, match=f"pid {holder.pid} on host"):
      with workdir_lib.exclusive(str(tmp_path)):
        pass
  finally:
    holder.kill()  # a crash: the operating system releases the lock
    holder.wait()
  with workdir_lib.exclusive(str(tmp_path)):
    pass


TWO_PROCESSES = textwrap.dedent("""
    import json, sys
    import jax
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from alignjax import workdir as workdir_lib
    try:
      with workdir_lib.exclusive(workdir):
        held = workdir_lib._holder(workdir + "/run.lock")
      outcome = "ran"
    except workdir_lib.WorkdirError as e:
      held, outcome = None, str(e)
    print("RESULT " + json.dumps({"outcome": outcome, "held": held}), flush=True)
    """)


def test_multi_host_only_process_0_locks_and_every_process_learns_its_outcome(tmp_path):
  script = tmp_path / "two.py"
  script.write_text(TWO_PROCESSES)
  workdir = tmp_path / "w"
  port = testing.free_port()
  first = testing.run_local_processes(script, [(i, port, workdir) for i in range(2)])
  assert [r["outcome"] for r in first] == ["ran", "ran"]
  assert first[0]["held"].startswith("pid ") and first[0]["held"] == first[1]["held"]
  with workdir_lib.exclusive(str(workdir)):  # another run holds it: both processes refuse
    port = testing.free_port()
    second = testing.run_local_processes(script, [(i, port, workdir) for i in range(2)])
  assert second[0]["outcome"] == second[1]["outcome"]
  assert f"in use by another run (pid {os.getpid()}" in second[1]["outcome"]
