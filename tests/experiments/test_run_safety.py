"""Runs never save garbage: blown-up runs stop, damaged checkpoints are caught, another run's
checkpoint is refused, one run per workdir, bad workdirs and inf settings are named.

Each case was a failure before alignjax.finite, alignjax.checksums, alignjax.run_identity and
alignjax.workdir existed (an adversarial user's session; see the module docstrings)."""

import glob
import hashlib
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alignjax import checkpoint, configs, finite, testing
from alignjax import workdir as workdir_lib
from experiments import ddpo as ddpo_script
from experiments import draft as draft_script
from experiments.configs.ddpo import digits as ddpo_configs
from experiments.configs.draft import digits as draft_configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOW_UP = {"optimizer.learning_rate": 1e6, "reward.name": "brightness"}


def ddpo_config(**overrides):
  config = ddpo_configs.get_config("tiny=True")
  config.update_from_flattened_dict(overrides)
  return config


def cli(script, config_arg, workdir, *overrides, wait=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  config_file = os.path.join(REPO, "experiments", "configs", script, "digits.py")
  cmd = [sys.executable, "-m", f"experiments.{script}", f"--config={config_file}:{config_arg}"]
  cmd += [f"--workdir={workdir}", *overrides]
  proc = subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def saved_arrays(step_dir):
  """The train state arrays of a step directory, read with Orbax alone (no template)."""
  tree = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "train_state"))
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def digest(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ----------------------------------------------------------------------------- validation
def test_inf_learning_rate_and_empty_or_impossible_workdir_are_named(tmp_path):
  with pytest.raises(
      configs.ConfigError, match="config.optimizer.learning_rate=inf: must be a finite"
  ):
    ddpo_script.validate(ddpo_config(**{"optimizer.learning_rate": float("inf")}), num_devices=8)
  with pytest.raises(configs.ConfigError, match="config.finite.policy='ignore'"):
    ddpo_script.validate(ddpo_config(**{"finite.policy": "ignore"}), num_devices=8)
  with pytest.raises(configs.ConfigError, match="checkpoint.on_damage='repair'"):
    ddpo_script.validate(ddpo_config(**{"checkpoint.on_damage": "repair"}), num_devices=8)
  with pytest.raises(workdir_lib.WorkdirError, match="--workdir is empty"):
    ddpo_script.run(ddpo_config(), "")
  (tmp_path / "file").write_text("")
  with pytest.raises(workdir_lib.WorkdirError, match="cannot create the directory"):
    ddpo_script.run(ddpo_config(), str(tmp_path / "file" / "run"))
  code, _, err = cli("ddpo", "tiny=True", "")
  assert code != 0 and "--workdir is empty" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- blow-ups
@pytest.mark.slow
def test_blown_up_ddpo_run_exits_nonzero_and_saves_nothing_non_finite(tmp_path):
  overrides = [f"--config.{k}={v}" for k, v in BLOW_UP.items()]
  code, _, err = cli(
      "ddpo",
      "tiny=True",
      tmp_path,
      *overrides,
      "--config.ddpo.num_minibatches=1",
      "--config.num_rounds=3",
  )
  assert code == 1, err[-2000:]
  assert "FATAL NonFiniteError: round 2: non-finite loss" in err
  assert f"last good checkpoint: step 1 in {tmp_path}/checkpoints/1" in err
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  assert all(np.all(np.isfinite(x)) for x in saved_arrays(tmp_path / "checkpoints" / "1"))
  for name in ("final_params.npz", "final_model", "summary.json", "summary.md"):
    assert not (tmp_path / name).exists(), name


@pytest.mark.slow
def test_blown_up_draft_run_stops_and_skip_policy_skips_then_stops(tmp_path):
  config = draft_configs.get_config("tiny=True")
  config.update_from_flattened_dict({**BLOW_UP, "num_updates": 4})
  with pytest.raises(finite.NonFiniteError, match=r"update \d: non-finite .*last good checkpoint"):
    draft_script.run(config, str(tmp_path / "stop"))
  assert not (tmp_path / "stop" / "final_params.npz").exists()
  config.update_from_flattened_dict({"finite.policy": "skip", "finite.max_consecutive_skips": 2})
  with pytest.raises(finite.NonFiniteError, match=r"2 updates in a row skipped"):
    draft_script.run(config, str(tmp_path / "skip"))
  steps = checkpoint.Checkpointer(
      tmp_path / "skip" / "checkpoints", save_every=1, keep=None
  ).all_steps()
  for step in steps:  # skipped updates kept the last finite state: every saved step is finite
    assert all(
        np.all(np.isfinite(x)) for x in saved_arrays(tmp_path / "skip" / "checkpoints" / str(step))
    )
  assert not (tmp_path / "skip" / "final_params.npz").exists()


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def finished_ddpo_run(tmp_path_factory):
  """A finished two-round DDPO run (checkpoints 1 and 2, summary, export)."""
  workdir = tmp_path_factory.mktemp("ddpo_done")
  result = ddpo_script.run(ddpo_config(), str(workdir))
  return workdir, result


def test_another_scripts_or_rewards_resume_is_refused_and_nothing_is_overwritten(finished_ddpo_run):
  workdir, _ = finished_ddpo_run
  outputs = ["final_params.npz", "summary.json", "summary.md", "metrics.jsonl"]
  before = {name: digest(workdir / name) for name in outputs}
  draft = draft_configs.get_config("tiny=True")
  with pytest.raises(
      checkpoint.CheckpointError,
      match="written by experiments.ddpo, but this run is experiments.draft",
  ):
    draft_script.run(draft, str(workdir))
  longer = ddpo_config(**{"reward.name": "brightness", "num_rounds": 3})
  with pytest.raises(checkpoint.CheckpointError) as info:
    ddpo_script.run(longer, str(workdir))
  msg = str(info.value)
  assert "config.reward.name: checkpoint 'classifier', now 'brightness'" in msg
  assert "num_rounds" not in msg  # a longer schedule is operational
  assert {name: digest(workdir / name) for name in outputs} == before


def test_bit_flipped_checkpoint_is_an_error_or_falls_back_to_the_intact_step(tmp_path):
  ddpo_script.run(ddpo_config(), str(tmp_path))
  testing.flip_saved_array_bytes(tmp_path / "checkpoints" / "2")
  step1 = {
      p: digest(p)
      for p in glob.glob(f"{tmp_path}/checkpoints/1/**/*", recursive=True)
      if os.path.isfile(p)
  }
  with pytest.raises(checkpoint.CheckpointDamagedError) as info:
    ddpo_script.run(ddpo_config(num_rounds=3), str(tmp_path))
  msg = str(info.value)  # flipped bytes that Orbax decodes silently meet the checksums
  assert f"{tmp_path}/checkpoints/2 (step 2)" in msg and "Nothing was deleted" in msg
  assert "do not match the checksums" in msg or "cannot be read" in msg
  assert {p: digest(p) for p in step1} == step1  # the older step is untouched
  result = ddpo_script.run(
      ddpo_config(**{"num_rounds": 3, "checkpoint.on_damage": "fallback"}), str(tmp_path)
  )
  assert [step for step, _ in result["history"]] == [1, 2, 3]  # resumed after round 1
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "2.damaged", "3"]


# ----------------------------------------------------------------------------- the lock
@pytest.mark.slow
def test_a_second_run_in_the_same_workdir_refuses_at_once_and_the_first_is_unaffected(
    tmp_path, finished_ddpo_run
):
  first = cli("ddpo", "tiny=True", tmp_path / "w", wait=False)
  lock = tmp_path / "w" / workdir_lib.LOCK_NAME
  deadline = time.time() + 120
  while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
    time.sleep(0.2)
  started = time.time()
  code, _, err = cli("ddpo", "tiny=True", tmp_path / "w")
  assert code == 1 and f"in use by another run (pid {first.pid} on host" in err, err[-2000:]
  assert time.time() - started < 60  # before it loads, compiles or writes anything
  _, first_err = first.communicate(timeout=300)
  assert first.returncode == 0, first_err[-2000:]
  ref_workdir, _ = finished_ddpo_run
  with (
      np.load(tmp_path / "w" / "final_params.npz") as got,
      np.load(ref_workdir / "final_params.npz") as ref,
  ):
    assert got.files == ref.files
    for name in ref.files:
      np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
