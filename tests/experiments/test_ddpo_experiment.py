"""experiments/ddpo.py end to end at tiny size: validation, sharding, multi-host, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flax import nnx

from alignjax import configs, metrics, testing, training
from experiments import ddpo as ddpo_script
from experiments.configs.ddpo import digits

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILE = os.path.join(REPO, "experiments", "configs", "ddpo", "digits.py")


def tiny_config(**overrides):
  config = digits.get_config("tiny=True")
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[name] = value
  return config


def final_params(workdir):
  state = np.load(os.path.join(workdir, "final_params.npz"))
  return {k: state[k] for k in state.files}


def train_records(workdir):
  """{step: the last logged training record}: a resumed run may log a round twice."""
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  drop = ("seconds_sampling", "seconds_round")
  return {
      r["step"]: {k: v for k, v in r.items() if k not in drop} for r in records if "approx_kl" in r
  }


def assert_params_close(a, b, atol):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("sampling.batch_size", -4, "config.sampling.batch_size=-4"),
        ("ddpo.objective", "ppo", "must be one of .clipped., .score_function."),
        ("ddpo.minibatch_loop", "while", "must be one of .unrolled., .scan."),
        ("reward.name", "aesthetic", "must be one of .classifier."),
        ("mesh.data", 3, "device"),
        ("sampling.batch_size", 12, "sampling.batch_size"),  # 12 does not split over 8 devices
        ("ddpo.num_minibatches", 3, "num_minibatches"),
        ("reward.target", 11, "reward.target"),
    ],
)
def test_bad_values_stop_the_run_before_compilation(key, value, message):
  with pytest.raises(configs.ConfigError, match=message):
    ddpo_script.validate(tiny_config(**{key: value}), num_devices=8)


def run_cli(workdir, *overrides, env=None, wait=True, devices=8):
  env = dict(os.environ if env is None else env)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [
      sys.executable,
      "-m",
      "experiments.ddpo",
      f"--config={CONFIG_FILE}:tiny=True",
      f"--workdir={workdir}",
      *overrides,
  ]
  proc = subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def test_a_mistyped_override_key_names_the_key_and_the_choices(tmp_path):
  code, out = run_cli(tmp_path, "--config.sampling.bach_size=4")
  assert code != 0
  assert "bach_size" in out and "batch_size" in out
  assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- in-process runs


def test_tiny_run_writes_logs_images_checkpoints_and_summary(tmp_path):
  result = ddpo_script.run(tiny_config(), str(tmp_path))
  assert np.isfinite(result["base_reward"]) and np.isfinite(result["final_reward"])
  records = train_records(tmp_path)
  assert sorted(records) == [1, 2]
  train = [records[1], records[2]]
  for field in ("reward_mean", "reward_std", "approx_kl", "clipfrac", "ratio_mean", "loss"):
    assert all(np.isfinite(r[field]) for r in train), field
  assert train[0]["on_policy_ratio_error"] < 1e-4  # conv rounding differs by batch shape
  for name in ("summary.md", "summary.json", "reward_curve.png", "final_params.npz"):
    assert (tmp_path / name).exists(), name
  images = os.listdir(tmp_path / "images")
  assert any(n.startswith("eval_base") for n in images)
  assert any(n.startswith("eval_final") for n in images)
  assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "2"
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["final_reward"] == pytest.approx(result["final_reward"])


def initial_lora(config):
  """The LoRA factors the script starts from: Finetune.split of the seeded tiny UNet with the
  script's init key (the first of three split from the seed), jitted as the script does."""
  base = nnx.split(testing.tiny_unet(seed=config.seed))[1]
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  finetune = training.Finetune.from_config(config.finetune)
  return jax.device_get(jax.jit(lambda p: finetune.split(p, init_key)[0])(base))


@pytest.mark.slow
def test_lora_trains_only_the_low_rank_factors(tmp_path):
  config = tiny_config(**{"finetune.mode": "lora", "num_rounds": 1})
  result = ddpo_script.run(config, str(tmp_path))
  trained, initial = jax.device_get(result["params"]), initial_lora(config)
  assert trained.keys() == initial.keys() and all(set(f) == {"a", "b"} for f in trained.values())
  steps = config.num_rounds * config.ddpo.inner_epochs * config.ddpo.num_minibatches
  testing.assert_lora_trained(trained, initial, steps, config.optimizer.learning_rate)


@pytest.mark.slow
def test_sharded_runs_match_one_device(tmp_path):
  # Adam's first step is lr·g/(|g| + eps): with a tiny eps it turns gradients at the level of
  # float32 summation-order noise (~1e-9, e.g. attention biases) into ±lr steps. A larger eps
  # keeps the comparison about the sharded computation, not about that amplification.
  adam = {"optimizer.eps": 1e-3, "optimizer.learning_rate": 1e-3, "num_rounds": 1}
  config = tiny_config(**adam)
  one = ddpo_script.run(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  initial = nnx.split(testing.tiny_unet(seed=config.seed))[1]
  moved = max(
      np.abs(np.asarray(a) - np.asarray(b)).max()
      for a, b in zip(jax.tree_util.tree_leaves(one["params"]), jax.tree_util.tree_leaves(initial))
  )
  assert moved > 1e-4  # the update is real, far above the tolerance
  for data, fsdp in ((4, 2), (2, 4)):
    workdir = tmp_path / f"data{data}_fsdp{fsdp}"
    many = ddpo_script.run(
        tiny_config(**adam, **{"mesh.data": data, "mesh.fsdp": fsdp}), str(workdir)
    )
    assert_params_close(final_params(tmp_path / "one"), final_params(workdir), 1e-5)
    assert many["final_reward"] == pytest.approx(one["final_reward"], abs=1e-4)


# ----------------------------------------------------------------------------- processes


def _wait_for_step(workdir, step, proc, timeout=240):
  ckpt = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(ckpt) and proc.poll() is None:
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before step {step}: {proc.stdout.read()}")
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f"no checkpoint {step} after {timeout}s")


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_parameters_and_metrics(tmp_path):
  # One device: resuming does not depend on the mesh, and a 1-device program compiles fast.
  rounds = "--config.num_rounds=4"
  code, out = run_cli(tmp_path / "straight", rounds, devices=1)
  assert code == 0, out
  proc = run_cli(tmp_path / "killed", rounds, wait=False, devices=1)
  _wait_for_step(tmp_path / "killed", 2, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  code, out = run_cli(tmp_path / "killed", rounds, devices=1)
  assert code == 0, out
  assert "Resumed from round" in out
  np.testing.assert_equal(final_params(tmp_path / "straight"), final_params(tmp_path / "killed"))
  assert train_records(tmp_path / "straight") == train_records(tmp_path / "killed")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  proc = run_cli(
      tmp_path, "--config.num_rounds=50", "--config.checkpoint.every=1000", wait=False, devices=1
  )
  deadline = time.time() + 240
  log = tmp_path / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:  # wait for the first round's metrics
    if log.exists() and any("approx_kl" in r for r in metrics.read_jsonl(str(log))):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert steps and 0 < max(steps) < 50


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  port = testing.free_port()
  # Adam with a larger eps, as in test_sharded_runs_match_one_device.
  adam = ["--config.optimizer.eps=1e-3", "--config.optimizer.learning_rate=1e-3"]
  common = [
      *adam,
      "--config.num_rounds=2",
      "--config.distributed.enabled=True",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      "--config.distributed.num_processes=2",
  ]
  procs = [
      run_cli(
          tmp_path / "two", *common, f"--config.distributed.process_id={i}", wait=False, devices=2
      )
      for i in range(2)
  ]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  code, out = run_cli(tmp_path / "one", *adam, "--config.num_rounds=2", devices=4)
  assert code == 0, out
  assert_params_close(final_params(tmp_path / "one"), final_params(tmp_path / "two"), 1e-5)
  one = json.loads((tmp_path / "one" / "summary.json").read_text())
  two = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert two["final_reward"] == pytest.approx(one["final_reward"], abs=1e-4)


# ----------------------------------------------------------------------------- reward curve


def test_reward_curve_and_eval_history_are_written_and_kept_on_resume(tmp_path):
  from PIL import Image

  first = ddpo_script.run(tiny_config(**{"eval.every": 1}), str(tmp_path))  # 2 rounds
  assert [r for r, _ in first["eval_history"]] == [0, 1, 2]
  assert (tmp_path / "reward_curve.png").stat().st_size > 0
  # a longer schedule resumes from the last checkpoint: the held-out points of rounds 0-2
  # come from its host state, only round 3 is evaluated anew
  longer = tiny_config(**{"eval.every": 1, "num_rounds": 3})
  resumed = ddpo_script.run(longer, str(tmp_path))
  assert resumed["eval_history"][:3] == first["eval_history"]
  assert [r for r, _ in resumed["eval_history"]] == [0, 1, 2, 3]
  assert all(np.isfinite(v) for _, v in resumed["eval_history"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["eval_history"] == resumed["eval_history"] and summary["method"] == "DDPO"
  assert "| DDPO, 3 rounds |" in (tmp_path / "summary.md").read_text()
  records = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  curve = [(r["step"], r["eval/curve_reward_mean"]) for r in records if "eval/reward_mean" in r]
  assert [s for s, _ in curve] == [0, 1, 2, 3]  # round 0 was evaluated once, not on resume
  assert [v for _, v in curve] == pytest.approx([v for _, v in resumed["eval_history"]])
  # started again after its last round: evaluated afresh, the history is not extended
  again = ddpo_script.run(longer, str(tmp_path))
  assert again["eval_history"] == resumed["eval_history"]
  # grids are enlarged log.image_scale times; eval grids hold one digit class per column
  unet_config = testing.tiny_unet(seed=longer.seed).config
  width, _ = Image.open(tmp_path / "images" / "eval_final_000003.png").size
  assert width == longer.log.image_scale * (
      unet_config.num_classes * (unet_config.image_size + 1) + 1
  )
