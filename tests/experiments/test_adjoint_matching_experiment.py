"""experiments/adjoint_matching.py at tiny size: validation, a run, resume, the flow variant."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from alignjax import configs, metrics, parallel, testing
from experiments import adjoint_matching as am_script
from experiments.configs.adjoint_matching import digits


def tiny_config(arg="", **overrides):
  config = digits.get_config("tiny=True" + (f",{arg}" if arg else ""))
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


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("sampling.batch_size", -4, r"config.sampling.batch_size=-4"),
        ("reward.name", "jpeg_compressibility", r"config.reward.name=.*'classifier', 'brightness'"),
        ("model.kind", "score", r"config.model.kind='score': must be one of 'eps', 'flow'"),
        ("sampling.eta", 0.0, r"config.sampling.eta=0.0: must lie in \(0.0, 1.0\]"),
        (
            "am.num_timesteps",
            5,
            r"config.am.num_timesteps=5 must be <= config.sampling.num_steps=4",
        ),
        ("am.lam", 0.0, r"config.am.lam=0.0: must be > 0"),
        ("eval.num_samples", 12, r"config.eval.num_samples=12"),
        ("sampling.batch_size", 4, "sampling.batch_size"),  # 4 does not split over 8 devices
        ("am.num_microbatches", 0, r"config.am.num_microbatches=0"),
        ("am.num_microbatches", 3, r"config.am.num_microbatches=3 must divide the \d+ \(sample"),
    ],
)
def test_bad_values_stop_the_run_before_compilation(key, value, message, tmp_path):
  with pytest.raises(configs.ConfigError, match=message):
    am_script.run(tiny_config(**{key: value}), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_config_docstring_and_variants():
  doc = digits.__doc__.lstrip()
  assert doc.startswith("Adjoint Matching") and "python -m experiments.adjoint_matching" in doc
  assert digits.get_config().model.kind == "eps"
  assert digits.get_config("model=flow").model.kind == "flow"
  with pytest.raises(configs.ConfigError, match="model='vae'"):
    digits.get_config("model=vae")
  am_script.validate(digits.get_config(), num_devices=1)
  am_script.validate(digits.get_config("model=flow,finetune=lora"), num_devices=1)
  flow = digits.get_config("model=flow")
  flow.am.num_microbatches = 2
  with pytest.raises(configs.ConfigError, match="flow model's update has no gradient accum"):
    am_script.validate(flow, num_devices=1)


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_tiny_run_writes_everything_and_resumes_to_the_same_parameters(tmp_path):
  straight = tmp_path / "straight"
  result = am_script.run(tiny_config(), str(straight))
  for name in ("summary.md", "summary.json", "reward_curve.png", "final_params.npz"):
    assert (straight / name).exists(), name
  summary = json.loads((straight / "summary.json").read_text())
  assert summary["final"] == result["final"] and summary["base"] == result["base"]
  for r in (result["base"], result["final"]):
    assert np.isfinite(r["reward"]) and 0 <= r["recognition"] <= 1 and r["diversity"] > 0
  table = (straight / "summary.md").read_text()
  assert "base" in table and "Adjoint Matching" in table and "diversity" in table
  records = metrics.read_jsonl(str(straight / "metrics.jsonl"))
  train = [r for r in records if "grad_norm" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
  images = os.listdir(straight / "images")
  assert any(n.startswith("eval_base") for n in images)
  assert any(n.startswith("eval_final") for n in images)
  assert sorted(os.listdir(straight / "checkpoints")) == ["1", "2"]
  # Full fine-tuning of the seeded tiny UNet: the exported parameters are the returned ones,
  # and num_iterations Adam steps moved every parameter, each by at most ~learning_rate per step
  # (|m̂/√v̂| <= 1.0014 for the first two steps).
  config = tiny_config()
  trained = final_params(straight)
  returned = dict(parallel.flatten_with_paths(result["params"])[0])
  base = dict(parallel.flatten_with_paths(nnx.split(testing.tiny_unet(seed=config.seed))[1])[0])
  assert trained.keys() == returned.keys() == base.keys()
  bound = 1.5 * config.num_iterations * config.optimizer.learning_rate
  for k in trained:
    np.testing.assert_array_equal(trained[k], np.asarray(returned[k]), err_msg=k)
    moved = np.abs(trained[k] - np.asarray(base[k])).max()
    assert 0 < moved <= bound, (k, moved, bound)

  # Resume: a copy of the run stopped after iteration 1 redoes iteration 2 from the
  # checkpoint (state, PRNG and host state restored) and ends where the straight run ended.
  resumed = tmp_path / "resumed"
  shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
  shutil.rmtree(resumed / "checkpoints" / "2")
  again = am_script.run(tiny_config(), str(resumed))
  assert again["base"] == result["base"]  # restored from the host state, not re-evaluated
  a, b = final_params(straight), final_params(resumed)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
  assert again["final"]["reward"] == pytest.approx(result["final"]["reward"], abs=1e-5)
  assert [h[0] for h in again["history"]] == [1, 2]


def test_tiny_flow_run(tmp_path):
  result = am_script.run(tiny_config("model=flow", num_iterations=1), str(tmp_path))
  assert np.isfinite(result["final"]["reward"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["model"] == "flow" and summary["iterations"] == 1
