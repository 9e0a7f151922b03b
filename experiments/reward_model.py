r"""Train a Bradley–Terry reward model from preference pairs and export it for transformers.

  python -m experiments.reward_model --config=experiments/configs/reward_model/arithmetic.py --workdir=runs/rm

A linear script, the first half of RLHF (the second: experiments/lm_online.py with
--config.judge.name=reward_model --config.judge.model_dir=<workdir>/reward_model):
  1. the pairs: `data.preferences` (JSONL: prompt, chosen, rejected, optional probability
     label) or, on the embedded task, two reference samples per training equation labelled by
     the judge (`judge.name`: arithmetic or raters); held-out pairs from held-out prompts (`data.eval_preferences`, or the held-out
     equations), never seen in training;
  2. the reward model: the reference LM's backbone (its weights; the output matrix dropped)
     with a scalar head read at the last real token (alignjax.models.heads eqs. 1-2);
  3. `steps` AdamW steps on the Bradley–Terry loss −log σ(r(x, y_c) − r(x, y_r)) with the
     pairs' labels as soft targets (alignjax.algorithms.preference_model eq. 1);
  4. held-out accuracy (the fraction of pairs ranked as the label says) and log-likelihood;
     the model saved in the transformers sequence-classification layout (`score.weight`),
     with the reference's tokenizer, to <workdir>/reward_model; report.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from flax import nnx

import alignjax.data as data_lib
from alignjax import configs, finite, parallel, scripts, training
from alignjax import workdir as workdir_lib
from alignjax.algorithms import preference_model as pm
from alignjax.lm import rollout as rollout_lib
from alignjax.models import convert, heads

scripts.make_importable(__file__, __package__)

from experiments import common, lm_common

REPORT_NAME = "report.json"


def validate(config) -> None:
  """Checks that fail before anything compiles; each message names the key."""
  # any programmatic judge labels the pairs: the arithmetic reward (transitive) or the raters
  # (cyclic, which a Bradley–Terry model cannot express: the RLHF baseline of selfplay_lm)
  configs.check_choice(config, "judge.name", ("arithmetic", "raters"))
  configs.check_integer(config, "steps", "batch_size", "data.num_prompts", "data.num_eval_prompts")
  configs.check_positive(config, "steps", "batch_size", "data.num_prompts", "data.num_eval_prompts")
  configs.check_optimizer(config)


def sampled_pairs(config, ref, judge, split: str, num_prompts: int, key) -> pm.PreferencePairs:
  """Two reference samples per prompt of the embedded `split`, P(a ≻ b) from the judge."""
  prompts = lm_common.embedded_prompts(config, split)
  order = np.random.default_rng([config.seed, split == "test"]).permutation(len(prompts))
  prompts = [prompts[i] for i in order[:num_prompts]]
  width = lm_common.prompt_width(config)
  tokens, valid = lm_common.encode_prompts(prompts, width)
  r = rollout_lib.rollout(
      ref.graphdef,
      ref.params,
      tokens,
      valid,
      key,
      lm_common.sampling_config(config.sampling),
      num_samples=2,
      max_prompt_len=width,
      min_bucket=width,
  )
  a = lm_common.completions(r.rows(slice(0, None, 2)))
  b = lm_common.completions(r.rows(slice(1, None, 2)))
  labels = np.asarray(judge.win_probability(a, b), np.float32)
  return pm.PreferencePairs(
      a.prompt_tokens, a.prompt_valid, a.tokens, a.valid, b.tokens, b.valid, labels
  )


def file_pairs(config, path: str) -> pm.PreferencePairs:
  """Pairs of a preferences JSONL file, tokenised by the reference's tokenizer."""
  dc = config.data
  prefs = data_lib.load_preferences(
      path,
      convert.load_tokenizer(config.reference.model_dir),
      max_length=int(dc.max_length),
      max_prompt_length=int(dc.max_prompt_length),
      label_key=dc.get("label_key", "p_chosen"),
  )
  whole = prefs.batch(np.arange(len(prefs)))
  return _split_rows(whole["chosen"], whole["rejected"], whole["label"])


def _split_rows(c, r, labels) -> pm.PreferencePairs:
  """Prompt + response rows [B, L] (left-padded, `mask` on the response) as a prompt block
  and right-aligned response blocks: the prompt keeps its tokens (valid & ~mask), each
  response its own (mask), all at full width (the heads read the packed sequence)."""
  prompt_valid = c["valid"] & ~c["mask"]
  return pm.PreferencePairs(
      np.where(prompt_valid, c["tokens"], 0),
      prompt_valid,
      np.where(c["mask"], c["tokens"], 0),
      c["mask"],
      np.where(r["mask"], r["tokens"], 0),
      r["mask"],
      labels,
  )


def reward_model_from(ref) -> heads.RewardModel:
  """A RewardModel whose backbone holds the reference LM's weights and a fresh head."""
  lm = nnx.merge(ref.graphdef, ref.params)
  model = heads.RewardModel(lm.config, rngs=nnx.Rngs(0))
  backbone = nnx.state(lm, nnx.Param)
  if "lm_head" in backbone:
    backbone = nnx.State({k: v for k, v in backbone.items() if k != "lm_head"})
  nnx.update(model.backbone, backbone)
  return model


def run(config, workdir: str) -> dict:
  """Trains, evaluates and exports; returns the report (also written to report.json)."""
  validate(config)
  with workdir_lib.exclusive(workdir) as workdir:
    return train(config, workdir)


def train(config, workdir: str) -> dict:
  t0 = time.time()
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  ref = lm_common.load_reference(config, mesh)
  judge = lm_common.make_judge(config.judge)
  key_train, key_test = jax.random.split(jax.random.key(config.seed))
  if config.data.preferences:
    if not config.data.eval_preferences:
      raise configs.ConfigError(
          "config.data.eval_preferences is empty: give held-out pairs (JSONL) with "
          "config.data.preferences"
      )
    train_pairs = file_pairs(config, config.data.preferences)
    test_pairs = file_pairs(config, config.data.eval_preferences)
  else:
    train_pairs = sampled_pairs(config, ref, judge, "train", config.data.num_prompts, key_train)
    test_pairs = sampled_pairs(config, ref, judge, "test", config.data.num_eval_prompts, key_test)
  decisive = lambda pairs: pairs.take(np.flatnonzero(np.asarray(pairs.labels) != 0.5))
  train_pairs, test_pairs = decisive(train_pairs), decisive(test_pairs)
  model = reward_model_from(ref)
  before = pm.evaluate_accuracy(*nnx.split(model), test_pairs)
  result = pm.train_reward_model(
      model,
      train_pairs,
      test_pairs,
      steps=config.steps,
      batch_size=config.batch_size,
      optimizer=training.OptimizerConfig(**config.optimizer),
      seed=config.seed,
      eval_every=config.eval_every,
  )
  params = nnx.state(result.model, nnx.Param)
  finite.check_host_tree(common.to_host_tree(params), "the reward model")
  out = os.path.join(workdir, "reward_model")
  convert.save_hf_reward(out, result.model, overwrite=True)
  convert.copy_tokenizer_files(ref.model_dir, out)
  report = {
      "test_accuracy": result.test_accuracy,
      "test_log_likelihood": result.test_log_likelihood,
      "test_accuracy_before": before[0],
      "num_train_pairs": len(train_pairs),
      "num_test_pairs": len(test_pairs),
      "final_train_loss": float(np.mean(result.train_loss[-10:])),
      "evals": [list(e) for e in result.evals],
      "reward_model_dir": out,
      "seconds": time.time() - t0,
      "config": json.loads(config.to_json()),
  }
  with open(os.path.join(workdir, REPORT_NAME), "w") as f:
    json.dump(report, f, indent=2)
  print(
      f"held-out accuracy {report['test_accuracy']:.3f} (untrained head "
      f"{report['test_accuracy_before']:.3f}) on {report['num_test_pairs']} pairs; "
      f"reward model in {out}",
      flush=True,
  )
  return report


if __name__ == "__main__":
  common.run_experiment_cli(run)
