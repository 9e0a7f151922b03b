"""experiments/draft.py end to end at tiny size: validation, every variant, LoRA, KL, resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from alignjax import configs, metrics, testing, training
from alignjax.diffusion import backend as backend_lib
from experiments import draft as draft_script
from experiments.configs.draft import digits

ONE_DEVICE = jax.devices()[:1]


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


def train_records(workdir):
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r for r in records if "grad_norm" in r}


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("draft.variant", "draft2", r"config.draft.variant='draft2': must be one of 'full', 'k'"),
        ("draft.truncation_k", 4, r"config.draft.truncation_k=4: must lie in \[1, 3\]"),
        ("draft.truncation_k", 0, r"config.draft.truncation_k=0"),
        ("sampling.batch_size", -16, r"config.sampling.batch_size=-16: must be > 0"),
        (
            "sampling.batch_size",
            12,
            r"config.sampling.batch_size=12: must be divisible by " r"data\*fsdp=8",
        ),
        ("mesh.data", 3, r"config.mesh"),
        ("draft.remat_policy", "offload", r"config.draft.remat_policy='offload'.*'full'"),
        ("reward.name", "jpeg_compressibility", r"config.reward.name=.*'classifier', 'brightness'"),
        ("draft.reward_scale", 0.0, r"config.draft.reward_scale=0.0"),
        ("draft.kl_weight", -1.0, r"config.draft.kl_weight=-1.0"),
        ("sampling.eta", 1.5, r"config.sampling.eta=1.5"),
        ("eval.num_samples", 24, r"config.eval.num_samples=24"),
    ],
)
def test_bad_values_stop_the_run_before_compilation(key, value, message):
  variant = "k" if key == "draft.truncation_k" else "full"
  with pytest.raises(configs.ConfigError, match=message):
    draft_script.validate(tiny_config(f"variant={variant}", **{key: value}), num_devices=8)


def test_lv_samples_are_checked_only_for_draft_lv():
  config = tiny_config("variant=lv", **{"draft.lv_samples": 0})
  with pytest.raises(configs.ConfigError, match=r"config.draft.lv_samples=0: must be > 0"):
    draft_script.validate(config, num_devices=8)
  draft_script.validate(tiny_config("variant=full", **{"draft.lv_samples": 0}), num_devices=8)


def test_an_unknown_variant_argument_names_the_choices():
  with pytest.raises(configs.ConfigError, match=r"variant='kk'.*'full', 'k', '1', 'lv'"):
    digits.get_config("variant=kk")


def test_variants_map_to_the_algorithm_options():
  options = {
      v: draft_script.draft_options(tiny_config(f"variant={v}")) for v in ("full", "k", "1", "lv")
  }
  assert options == {
      "full": dict(truncation_k=None, lv_samples=0),
      "k": dict(truncation_k=2, lv_samples=0),
      "1": dict(truncation_k=1, lv_samples=0),
      "lv": dict(truncation_k=None, lv_samples=2),
  }
  assert digits.get_config("variant=k").draft.truncation_k == 5  # the full-size default


def test_balanced_prompts_hold_every_class_equally_often():
  prompts = draft_script.balanced_prompts(32, 10, seed=3)
  counts = np.bincount(prompts, minlength=10)
  assert prompts.dtype == np.int32 and counts.sum() == 32 and set(counts) == {3, 4}
  assert not np.array_equal(prompts, draft_script.balanced_prompts(32, 10, seed=4))
  # the digits backend's training prompts are these, ids as labels and keys
  batch = draft_script.train_prompts(
      backend_lib.digits_backend(testing.tiny_unet(), None, {}, None), 32, 3
  )
  np.testing.assert_array_equal(batch.cond, prompts)
  np.testing.assert_array_equal(batch.labels, prompts)


# ----------------------------------------------------------------------------- runs


def check_outputs(workdir, result, config, queries_per_update):
  n = config.num_updates
  records = train_records(workdir)
  assert sorted(records) == list(range(1, n + 1))
  for step, r in records.items():
    for field in ("reward_mean", "reward_std", "grad_norm", "diversity", "loss"):
      assert np.isfinite(r[field]), (step, field)
    assert r["grad_norm"] > 0 and r["diversity"] > 0
    assert r["reward_queries"] == step * queries_per_update
  for name in (
      "summary.md",
      "summary.json",
      "reward_curve.png",
      "diversity_curve.png",
      "final_params.npz",
      "final_model/config.json",
  ):
    assert (workdir / name).exists(), name
  images = os.listdir(workdir / "images")
  assert any(i.startswith("eval_base") for i in images)
  assert any(i.startswith("eval_final") for i in images)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final"]["reward_mean"] == pytest.approx(result["final"]["reward_mean"])
  assert summary["reward_queries"] == n * queries_per_update
  table = (workdir / "summary.md").read_text()
  assert "| base |" in table and "within-class diversity" in table
  return records


@pytest.mark.slow
def test_full_draft_with_kl_penalty(tmp_path):
  config = tiny_config("variant=full", **{"draft.kl_weight": 0.5})
  result = draft_script.run(config, str(tmp_path), devices=ONE_DEVICE)
  records = check_outputs(tmp_path, result, config, 16)
  assert records[2]["kl_penalty"] > 0  # the model moved away from the base after step 1
  assert "DRaFT, full, 2 updates" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_draft_lv_with_fsdp_sharding(tmp_path):
  config = tiny_config("variant=lv", **{"mesh.data": 1, "mesh.fsdp": 2})
  result = draft_script.run(config, str(tmp_path), devices=jax.devices()[:2])
  check_outputs(tmp_path, result, config, 16 * 2)
  assert "DRaFT-LV (n=2)" in (tmp_path / "summary.md").read_text()


def test_draft_1_with_lora_trains_only_the_low_rank_factors(tmp_path):
  config = tiny_config("variant=1,finetune=lora", **{"draft.kl_weight": 0.1})
  result = draft_script.run(config, str(tmp_path), devices=ONE_DEVICE)
  check_outputs(tmp_path, result, config, 16)
  leaves = jax.tree_util.tree_leaves_with_path(result["params"])
  names = [jax.tree_util.keystr(p) for p, _ in leaves]
  assert names and all(n.endswith(("['a']", "['b']")) for n in names), names[:4]
  # The factors the script started from: Finetune.split of the seeded tiny UNet with the
  # script's init key (the first of three split from the seed), jitted as the script does.
  base = nnx.split(testing.tiny_unet(seed=config.seed))[1]
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  finetune = training.Finetune.from_config(config.finetune)
  initial = jax.device_get(jax.jit(lambda p: finetune.split(p, init_key)[0])(base))
  trained = jax.device_get(result["params"])
  testing.assert_lora_trained(trained, initial, config.num_updates, config.optimizer.learning_rate)


@pytest.mark.slow
def test_draft_k_resumes_from_a_checkpoint_at_the_saved_step(tmp_path):
  config = tiny_config("variant=k")
  straight = draft_script.run(config, str(tmp_path / "straight"), devices=ONE_DEVICE)
  check_outputs(tmp_path / "straight", straight, config, 16)
  # a run that stopped after step 1: only its checkpoint exists
  shutil.copytree(
      tmp_path / "straight" / "checkpoints" / "1", tmp_path / "resumed" / "checkpoints" / "1"
  )
  resumed = draft_script.run(config, str(tmp_path / "resumed"), devices=ONE_DEVICE)
  assert sorted(train_records(tmp_path / "resumed")) == [2]  # continues at step 2
  assert resumed["base"] == straight["base"]  # restored, not re-evaluated
  np.testing.assert_equal(final_params(tmp_path / "straight"), final_params(tmp_path / "resumed"))
  assert resumed["history"] == straight["history"]
