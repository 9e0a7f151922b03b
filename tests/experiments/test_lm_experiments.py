"""experiments/lm_online.py and lm_offline.py end to end at tiny size: every algorithm and
loss, LoRA, resume, export, and the errors of bad configs."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from alignjax import configs, judges, testing, training
from alignjax.data import synthetic_language as lang
from alignjax.models import convert, lora
from alignjax.models.lm import TransformerLM
from alignjax.models.lm_config import LMConfig
from experiments import lm_common, lm_offline, lm_online
from experiments.configs.lm_offline import arithmetic as offline_config
from experiments.configs.lm_online import arithmetic as online_config

ONE_DEVICE = jax.devices()[:1]
TINY = LMConfig(
    family="llama",
    vocab_size=lang.VOCAB_SIZE,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=32,
    max_position_embeddings=32,
    bos_token_id=lang.BOS_ID,
    eos_token_ids=(lang.EOS_ID,),
    pad_token_id=lang.PAD_ID,
)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
  """A random tiny LM of the synthetic language, saved as an HF directory with its tokenizer
  (weights large enough that its samples vary, so the judge's verdicts do)."""
  directory = str(tmp_path_factory.mktemp("reference"))
  model = testing.host_init(lambda rngs: TransformerLM(TINY, rngs=rngs), seed=0)
  convert.save_hf_lm(directory, model)
  lang.save_tokenizer(directory)
  return directory


def configure(module, arg, reference_dir, **overrides):
  config = module.get_config("smoke=True" + (f",{arg}" if arg else ""))
  config.reference.model_dir = reference_dir
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
      target = target[part]
    target[name] = value
  return config


def reference_params(reference_dir):
  model, _ = convert.load_hf_lm(reference_dir)
  return nnx.state(model, nnx.Param)


def assert_moved(trained, initial):
  moved = jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained, initial
  )
  assert max(jax.tree.leaves(moved)) > 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trained))


# ----------------------------------------------------------------------------- online


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "online_ipo"])
def test_online_algorithms_train_evaluate_and_export(algorithm, reference_dir, tmp_path):
  config = configure(online_config, f"algorithm={algorithm}", reference_dir)
  out = lm_online.run(config, str(tmp_path), devices=ONE_DEVICE)
  initial = reference_params(reference_dir)
  assert_moved(out["params"], initial)
  assert [p[0] for p in out["eval_history"]] == [0, 1, 2]
  assert 0 <= out["final"]["win_rate"] <= 1
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["algorithm"] == algorithm and summary["final"] == out["final"]
  exported, _ = convert.load_hf_lm(str(tmp_path / "final_model"))
  np.testing.assert_array_equal(
      np.asarray(nnx.state(exported, nnx.Param)["layers"][0]["attn"]["q"]["kernel"][...]),
      np.asarray(out["params"]["layers"][0]["attn"]["q"]["kernel"][...]),
  )
  assert os.path.isfile(tmp_path / "final_model" / "tokenizer.json")


def test_online_lora_trains_only_the_adapters(reference_dir, tmp_path):
  config = configure(online_config, "finetune=lora", reference_dir)
  out = lm_online.run(config, str(tmp_path), devices=ONE_DEVICE)
  base = reference_params(reference_dir)
  model = nnx.merge(nnx.graphdef(convert.load_hf_lm(reference_dir)[0]), base)
  plan = lora.lm_lora_plan(model, tuple(config.finetune.lora_modules))
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  finetune = training.Finetune.from_config(config.finetune)
  initial, _ = finetune.split(base, init_key, plan)
  assert sorted(out["params"]) == sorted(initial)  # q, k, v, o, gate, up, down of the layer
  testing.assert_lora_trained(out["params"], initial, 2, config.optimizer.learning_rate)
  exported = nnx.state(convert.load_hf_lm(str(tmp_path / "final_model"))[0], nnx.Param)
  np.testing.assert_array_equal(  # not adapted: unchanged
      np.asarray(exported["embed"]["embedding"][...]), np.asarray(base["embed"]["embedding"][...])
  )


def test_online_resume_equals_uninterrupted(reference_dir, tmp_path):
  whole = lm_online.run(
      configure(online_config, "", reference_dir), str(tmp_path / "whole"), devices=ONE_DEVICE
  )
  first = configure(online_config, "", reference_dir, num_iterations=1)
  lm_online.run(first, str(tmp_path / "split"), devices=ONE_DEVICE)
  resumed = lm_online.run(
      configure(online_config, "", reference_dir), str(tmp_path / "split"), devices=ONE_DEVICE
  )
  assert training.tree_max_abs_diff(whole["params"], resumed["params"]) == 0
  assert resumed["eval_history"] == whole["eval_history"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(algorithm="ppo"), r"config.algorithm='ppo': must be one of 'grpo', 'rloo'"),
        (dict(algorithm="online_ipo"), r"config.num_samples=4: online_ipo compares pairs"),
        (dict(num_samples=1), r"config.num_samples=1: grpo normalises within a group"),
        (dict(num_minibatches=3), r"config.prompts_per_iteration=8: must be divisible by 3"),
        (dict(**{"grpo.length_norm": "tokens"}), r"config.grpo.length_norm='tokens'"),
        (dict(**{"judge.name": "gpt"}), r"config.judge.name='gpt': must be one of 'arithmetic'"),
        (dict(**{"reference.model_dir": "/nonexistent"}), r"is not a directory"),
    ],
)
def test_online_bad_configs_fail_clearly(overrides, message, reference_dir, tmp_path):
  config = configure(online_config, "", reference_dir, **overrides)
  with pytest.raises(configs.ConfigError, match=message):
    lm_online.run(config, str(tmp_path), devices=ONE_DEVICE)


class _BiasedJudge(judges.Judge):
  """P(a ≻ b) = 0.7 whatever the responses: in [0, 1] but not antisymmetric."""

  def win_probability(self, a, b):
    return np.full(len(a), 0.7)


def test_online_run_stops_on_a_judge_that_is_not_antisymmetric(
    reference_dir, tmp_path, monkeypatch
):
  monkeypatch.setattr(lm_common, "make_judge", lambda *args, **kwargs: _BiasedJudge())
  config = configure(online_config, "algorithm=spo", reference_dir)
  with pytest.raises(judges.JudgeError, match=r"_BiasedJudge is not antisymmetric: .* = 1\.4"):
    lm_online.run(config, str(tmp_path), devices=ONE_DEVICE)
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


# ----------------------------------------------------------------------------- offline


@pytest.mark.parametrize(
    "loss,overrides",
    [
        ("dpo", {"data.samples_per_prompt": 3}),  # the best and worst of three samples
        ("cdpo", {}),
        ("rpo", {}),
        ("ipo", {}),
        ("sppo", {}),
    ],
)
def test_offline_losses_train_on_judged_pairs(loss, overrides, reference_dir, tmp_path):
  config = configure(offline_config, f"loss={loss}", reference_dir, **overrides)
  out = lm_offline.run(config, str(tmp_path), devices=ONE_DEVICE)
  assert_moved(out["params"], reference_params(reference_dir))
  records = [json.loads(l) for l in open(tmp_path / "preferences.jsonl")]
  assert len(records) == out["num_pairs"] >= config.batch_size
  for rec in records:  # the judge preferred the chosen completion
    assert lang.arithmetic_reward(rec["prompt"], rec["chosen"]) > lang.arithmetic_reward(
        rec["prompt"], rec["rejected"]
    )
  assert os.path.isdir(tmp_path / "final_model")


def test_offline_bad_configs_fail_clearly(reference_dir, tmp_path):
  config = configure(offline_config, "", reference_dir, **{"dpo.beta": 0.0})
  with pytest.raises(configs.ConfigError, match=r"config.dpo.beta=0.0: must be > 0"):
    lm_offline.run(config, str(tmp_path), devices=ONE_DEVICE)
  config = configure(offline_config, "", reference_dir, **{"data.samples_per_prompt": 1})
  with pytest.raises(
      configs.ConfigError, match=r"config.data.samples_per_prompt=1: an integer >= 2"
  ):
    lm_offline.run(config, str(tmp_path / "k"), devices=ONE_DEVICE)
  config = configure(offline_config, "", reference_dir, batch_size=1000)
  with pytest.raises(configs.ConfigError, match=r"decisive pairs .* raise data.num_prompts"):
    lm_offline.run(config, str(tmp_path / "b"), devices=ONE_DEVICE)


class _ValueJudge:
  """P(a ≻ b) of the responses' first tokens read as values: 1, 0 or ½ on a tie."""

  def win_probability(self, a, b):
    va, vb = np.asarray(a.tokens[:, 0]), np.asarray(b.tokens[:, 0])
    return np.where(va > vb, 1.0, np.where(va < vb, 0.0, 0.5))


def _completions(values):
  values = np.asarray(values, np.int32)[:, None]
  ones = np.ones_like(values, bool)
  return judges.Completions(values, ones, values, ones)


def test_round_robin_extremes_pick_each_prompts_best_and_worst_sample():
  values = np.random.default_rng(0).permutation(np.arange(6 * 5)).reshape(6, 5)  # no ties
  best, worst = lm_offline.round_robin_extremes(
      _ValueJudge(), [_completions(values[:, i]) for i in range(5)]
  )
  np.testing.assert_array_equal(best, values.argmax(1))
  np.testing.assert_array_equal(worst, values.argmin(1))
  # K = 2 pairs sample 0 with sample 1 whichever wins; a tie puts best at 0 and worst at 1
  best, worst = lm_offline.round_robin_extremes(
      _ValueJudge(), [_completions([3, 1, 2]), _completions([1, 3, 2])]
  )
  np.testing.assert_array_equal(best, [0, 1, 0])
  np.testing.assert_array_equal(worst, [1, 0, 1])


# ----------------------------------------------------------------------------- at scale


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_llama_1b_config_lowers_one_sharded_training_step(finetune):
  """One GRPO step of experiments/configs/lm_online/llama_1b.py on the Llama-3.2-1B shape,
  from abstract shapes only, on a data=2 × fsdp=4 mesh: every parameter and Adam moment of
  the state is sharded as the rules say, and the step lowers with those shardings."""
  from experiments.configs.lm_online import llama_1b

  from alignjax import parallel
  from alignjax.lm import rollout as rollout_lib

  config = llama_1b.get_config(f"finetune={finetune}")
  model_config = LMConfig(**config.model_shape)
  mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1))
  abstract = nnx.eval_shape(lambda: TransformerLM(model_config, rngs=nnx.Rngs(0)))
  graphdef, ref_shapes = nnx.split(abstract)
  assert 1.2e9 < sum(x.size for x in jax.tree.leaves(ref_shapes)) < 1.3e9
  finetune_ = training.Finetune.from_config(config.finetune)
  optimizer = training.make_optimizer(config.optimizer)
  plan = lora.lm_lora_plan(abstract, tuple(config.finetune.lora_modules))
  init_state = lm_common.make_init_state(finetune_, optimizer, plan, jax.random.key(0))
  state_shapes = jax.eval_shape(init_state, ref_shapes)
  rules = lm_common.sharding_rules(config)
  state_shardings = parallel.param_shardings(state_shapes, mesh, rules)
  ref_shardings = parallel.param_shardings(ref_shapes, mesh, rules)

  b, p, n = 16, config.data.max_prompt_length, config.sampling.max_new_tokens
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA_AXES))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  r = rollout_lib.Rollout(
      prompt_tokens=spec((b, p), np.int32),
      prompt_valid=spec((b, p), bool),
      tokens=spec((b, n), np.int32),
      valid=spec((b, n), bool),
      log_probs=spec((b, n), np.float32),
      model_log_probs=spec((b, n), np.float32),
  )
  batch = {
      "rollout": r,
      "mask": r.valid,
      "old_logp": spec((b, n), np.float32),
      "ref_logp": spec((b, n), np.float32),
      "advantages": spec((b,), np.float32),
  }
  lora_base = ref_shapes if finetune == "lora" else {}
  lora_shardings = ref_shardings if finetune == "lora" else {}
  with_sharding = lambda shapes, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  update = lm_online.make_update(config, graphdef, finetune_, optimizer)
  lowered = jax.jit(update, out_shardings=(state_shardings, None)).lower(
      with_sharding(state_shapes, state_shardings), with_sharding(lora_base, lora_shardings), batch
  )
  assert lowered.out_info[1]["loss"].shape == ()
  # Nothing big is replicated: every leaf over 2^20 elements is split over fsdp.
  flat = jax.tree_util.tree_flatten_with_path(state_shardings)[0]
  shapes = dict(
      (parallel.path_str(path), x.shape)
      for path, x in jax.tree_util.tree_flatten_with_path(state_shapes)[0]
  )
  for path, sharding in flat:
    name = parallel.path_str(path)
    if np.prod(shapes[name]) >= 2**20:
      assert "fsdp" in jax.tree.leaves(tuple(sharding.spec)), (name, sharding.spec)


# ----------------------------------------------------------------------------- multi-host

CHILD = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from experiments import lm_online
from experiments.configs.lm_online import arithmetic

pid, port, reference_dir, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = arithmetic.get_config("smoke=True")
config.reference.model_dir = reference_dir
config.distributed.update(enabled=True, coordinator_address=f"127.0.0.1:{port}",
                          num_processes=2, process_id=pid, initialization_timeout=60)
out = lm_online.run(config, workdir)
leaves = jax.tree_util.tree_flatten_with_path(out["params"])[0]
sums = {jax.tree_util.keystr(p): float(np.asarray(x, np.float64).sum()) for p, x in leaves}
print("RESULT " + json.dumps({"sums": sums, "eval": out["eval_history"]}), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_train_the_parameters_of_one(reference_dir, tmp_path):
  """Sample → judge → update on 2 processes × 2 devices equals 1 process × 4 devices with the
  same global batch (prompts, keys, responses, verdicts and updates)."""
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  port = testing.free_port()
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  results = testing.run_local_processes(
      script,
      [(i, port, reference_dir, tmp_path / "two") for i in range(2)],
      pythonpath=repo,
      timeout=240,
  )
  assert results[0] == results[1]
  single = lm_online.run(
      configure(online_config, "", reference_dir), str(tmp_path / "one"), devices=jax.devices()[:4]
  )
  leaves = jax.tree_util.tree_flatten_with_path(single["params"])[0]
  sums = {jax.tree_util.keystr(p): float(np.asarray(x, np.float64).sum()) for p, x in leaves}
  assert results[0]["sums"].keys() == sums.keys()
  for name, value in sums.items():
    np.testing.assert_allclose(results[0]["sums"][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert [e[0] for e in results[0]["eval"]] == [e[0] for e in single["eval_history"]]
  np.testing.assert_allclose(
      [e[1:] for e in results[0]["eval"]], [e[1:] for e in single["eval_history"]], atol=1e-6
  )
  assert_moved(single["params"], reference_params(reference_dir))


# ----------------------------------------------------------------------------- data files


def test_online_and_offline_read_prompt_and_preference_files(reference_dir, tmp_path):
  """The scripts on JSONL files tokenised by the reference's (transformers) tokenizer: the
  prompts an online run samples from, and the preference pairs an embedded offline run wrote
  (preferences.jsonl) trained on again from the file."""
  train = [{"prompt": p} for p in ("12+7=", "3-1=", "40+2=", "9-9=") * 2]
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
  (tmp_path / "eval.txt").write_text("".join(f"{a}+{a}=\n" for a in range(16)))
  config = configure(
      online_config,
      "",
      reference_dir,
      **{
          "data.prompts": str(tmp_path / "prompts.jsonl"),
          "data.eval_prompts": str(tmp_path / "eval.txt"),
          "data.max_prompt_length": 8,
      },
  )
  out = lm_online.run(config, str(tmp_path / "online"), devices=ONE_DEVICE)
  assert_moved(out["params"], reference_params(reference_dir))

  first = configure(offline_config, "", reference_dir)
  lm_offline.run(first, str(tmp_path / "offline"), devices=ONE_DEVICE)
  records = [json.loads(l) for l in open(tmp_path / "offline" / "preferences.jsonl")]
  # the loader refuses empty completions (tests/data); the reference does sample some
  records = [r for r in records if r["chosen"] and r["rejected"]]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  config = configure(
      offline_config,
      "",
      reference_dir,
      **{
          "data.preferences": str(tmp_path / "pairs.jsonl"),
          "data.eval_prompts": str(tmp_path / "eval.txt"),
          "data.max_length": 16,
          "data.max_prompt_length": 8,
      },
  )
  again = lm_offline.run(config, str(tmp_path / "from_file"), devices=ONE_DEVICE)
  assert again["num_pairs"] == len(records)
  assert_moved(again["params"], reference_params(reference_dir))


def test_data_files_without_held_out_prompts_fail_clearly(reference_dir, tmp_path):
  (tmp_path / "prompts.txt").write_text("1+1=\n")
  config = configure(
      online_config, "", reference_dir, **{"data.prompts": str(tmp_path / "prompts.txt")}
  )
  with pytest.raises(configs.ConfigError, match=r"config.data.eval_prompts is empty"):
    lm_online.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)


@pytest.mark.parametrize("algorithm", ["nash_md", "nash_ema", "spo"])
def test_self_play_algorithms_on_the_intransitive_judge(algorithm, reference_dir, tmp_path):
  config = configure(online_config, f"algorithm={algorithm},judge=raters", reference_dir)
  out = lm_online.run(config, str(tmp_path), devices=ONE_DEVICE)
  assert_moved(out["params"], reference_params(reference_dir))
  expected = {"win_rate", "average_win_rate"} if algorithm == "spo" else {"win_rate"}
  assert set(out["final"]) == expected  # a preference judge has no reward
  assert all(0 <= v <= 1 for v in out["final"].values())


def test_spo_average_iterate_is_the_mean_of_the_iterates_and_resumes(reference_dir, tmp_path):
  """SPO keeps θ̄ = mean(θ_0 .. θ_n) in its checkpoints: a run resumed after one iteration
  ends with the uninterrupted run's parameters and average."""
  arg = "algorithm=spo,judge=raters"
  whole = lm_online.run(
      configure(online_config, arg, reference_dir), str(tmp_path / "w"), devices=ONE_DEVICE
  )
  first = configure(online_config, arg, reference_dir, num_iterations=1)
  one = lm_online.run(first, str(tmp_path / "s"), devices=ONE_DEVICE)
  resumed = lm_online.run(
      configure(online_config, arg, reference_dir), str(tmp_path / "s"), devices=ONE_DEVICE
  )
  assert training.tree_max_abs_diff(whole["params"], resumed["params"]) == 0
  assert whole["final"] == resumed["final"]
  theta0 = reference_params(reference_dir)
  expected = jax.tree.map(
      lambda a, b, c: (np.asarray(a) + np.asarray(b) + np.asarray(c)) / 3,
      theta0,
      one["params"],
      whole["params"],
  )
  np.testing.assert_allclose(
      np.asarray(whole["average"]["layers"][0]["mlp"]["up"]["kernel"][...]),
      np.asarray(expected["layers"][0]["mlp"]["up"]["kernel"][...]),
      atol=1e-6,
  )


def test_self_play_configs_fail_clearly(reference_dir, tmp_path):
  for overrides, message in [
      (dict(algorithm="nash_md", **{"nash_md.beta": 1.5}), r"config.nash_md.beta=1.5"),
      (dict(algorithm="nash_md", **{"nash_md.tau": 0.0}), r"config.nash_md.tau=0.0: must be > 0"),
      (dict(algorithm="nash_md"), r"config.num_samples=4: nash_md draws one response"),
      (dict(algorithm="spo", num_samples=1), r"config.num_samples=1: spo normalises"),
  ]:
    config = configure(online_config, "", reference_dir, **overrides)
    with pytest.raises(configs.ConfigError, match=message):
      lm_online.run(config, str(tmp_path / "x"), devices=ONE_DEVICE)


def test_selfplay_lm_table_judges_every_pair_of_policies(reference_dir, tmp_path):
  from experiments.tables import selfplay_lm

  out = selfplay_lm.run(
      str(tmp_path),
      iterations=1,
      num_prompts=16,
      reference_dir=reference_dir,
      smoke=True,
      devices=ONE_DEVICE,
  )
  names = ["reference", *selfplay_lm.METHODS, "SPO (average)", *selfplay_lm.BASELINES]
  assert len(out["pairs"]) == len(names) * (len(names) - 1)
  for a in names:
    for b in names:
      if a != b:  # the same samples judged both ways: an antisymmetric judge sums to 1
        w = out["pairs"][f"{a} vs {b}"]["win_rate"] + out["pairs"][f"{b} vs {a}"]["win_rate"]
        assert w == pytest.approx(1.0, abs=1e-12)
  assert (tmp_path / "selfplay_lm.md").read_text().strip() == out["table"].strip()
  assert json.loads((tmp_path / "selfplay_lm.json").read_text())["pairs"] == out["pairs"]


# ----------------------------------------------------------------------------- RLHF


def test_reward_model_trains_exports_and_judges_an_online_run(reference_dir, tmp_path):
  """experiments/reward_model.py fits a Bradley–Terry head on the reference's backbone,
  exports it in the transformers layout, and lm_online uses it as its judge (RLHF)."""
  from experiments import reward_model
  from experiments.configs.reward_model import arithmetic as rm_config

  config = rm_config.get_config("smoke=True")
  config.reference.model_dir = reference_dir
  config.steps = 6
  report = reward_model.run(config, str(tmp_path / "rm"))
  assert report["num_test_pairs"] > 0 and 0 <= report["test_accuracy"] <= 1
  rm, _ = convert.load_hf_reward(report["reward_model_dir"])
  backbone = nnx.state(rm.backbone, nnx.Param)
  ref = reference_params(reference_dir)
  np.testing.assert_array_equal(  # the backbone started from the reference and trained
      np.asarray(ref["embed"]["embedding"][...]).shape,
      np.asarray(backbone["embed"]["embedding"][...]).shape,
  )
  assert (
      np.abs(
          np.asarray(backbone["embed"]["embedding"][...])
          - np.asarray(ref["embed"]["embedding"][...])
      ).max()
      > 0
  )
  online = configure(
      online_config,
      "",
      reference_dir,
      **{"judge.name": "reward_model", "judge.model_dir": report["reward_model_dir"]},
  )
  out = lm_online.run(online, str(tmp_path / "rlhf"), devices=ONE_DEVICE)
  assert_moved(out["params"], ref)
  assert {"win_rate", "reward"} <= set(out["final"])


def test_offline_gold_pairs_put_the_answer_against_each_wrong_sample(reference_dir, tmp_path):
  config = configure(offline_config, "", reference_dir, **{"data.chosen": "gold"})
  out = lm_offline.run(config, str(tmp_path), devices=ONE_DEVICE)
  records = [json.loads(l) for l in open(tmp_path / "preferences.jsonl")]
  assert len(records) == out["num_pairs"] > 0
  for rec in records:
    assert rec["chosen"] == str(lang.true_answer(rec["prompt"])) != rec["rejected"]
    assert rec["p_chosen"] == 1.0
  assert_moved(out["params"], reference_params(reference_dir))
