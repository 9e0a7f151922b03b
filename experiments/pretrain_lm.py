r"""Pretrain the embedded tiny LM on the synthetic arithmetic language.

  python -m experiments.pretrain_lm --config=experiments/configs/pretrain_lm/tiny.py --workdir=runs/pretrain_lm

A linear script: language (alignjax.data.synthetic_language) → Llama-shaped TransformerLM
trained with AdamW in a jitted, donated step → greedy completion of held-out equations with
the alignjax sampler → model + tokenizer saved in the Hugging Face format → report.json.

Objective: next-token cross-entropy over the real tokens of left-padded sentences
y = <bos> a op b = c <eos>, with the teacher-forced log-probs of `alignjax.lm.scoring` (eq. 1):

  L(theta) = - sum_{b, t >= 1, valid} log p_theta(y_{b,t} | y_{b,<t}) / #scored tokens     (1)

Evaluation: the prompt "<bos> a op b =" is completed greedily (temperature 0, stop at <eos>);

  accuracy = (1 / n) sum_i 1[decode(completion_i) == str(c_i)]                            (2)
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax import configs, finite, metrics, run_identity, scripts, training
from alignjax import workdir as workdir_lib
from alignjax.data import synthetic_language as lang
from alignjax.lm import sampling, scoring
from alignjax.models import convert
from alignjax.models.lm import TransformerLM
from alignjax.models.lm_config import LMConfig

scripts.make_importable(__file__, __package__)

REPORT_NAME = "report.json"
MODEL_DIR = "model"


def validate(config) -> None:
  """Checks that fail before any compilation; messages name the key."""
  configs.check_positive(
      config,
      "train.steps",
      "train.batch_size",
      "train.learning_rate",
      "train.log_every",
      "eval.num_examples",
      "eval.batch_size",
      "data.max_operand",
      *(
          f"model.{k}"
          for k in (
              "hidden_size",
              "num_layers",
              "num_heads",
              "num_kv_heads",
              "head_dim",
              "mlp_dim",
              "max_position_embeddings",
          )
      ),
  )
  configs.check_nonnegative(
      config, "train.warmup_steps", "train.weight_decay", "train.max_grad_norm"
  )
  configs.check_fraction(config, "data.test_fraction")
  finite.validate_config(config)
  needed = lang.max_sentence_length(config.data.max_operand)
  if config.model.max_position_embeddings < needed:
    raise configs.ConfigError(
        f"config.model.max_position_embeddings={config.model.max_position_embeddings}: must "
        f"be >= {needed}, the longest sentence for max_operand={config.data.max_operand}"
    )


def lm_config(config) -> LMConfig:
  return LMConfig(
      family="llama",
      vocab_size=lang.VOCAB_SIZE,
      bos_token_id=lang.BOS_ID,
      eos_token_ids=(lang.EOS_ID,),
      pad_token_id=lang.PAD_ID,
      norm_eps=1e-5,
      **config.model.to_dict(),
  )


def lm_loss(graphdef, params, tokens, valid):
  """Mean next-token negative log-likelihood over real tokens after the first (eq. 1)."""
  out = scoring.score(graphdef, params, tokens, valid, valid)
  count = jnp.maximum(jnp.sum(valid) - tokens.shape[0], 1)
  return -jnp.sum(out.sums) / count


def train(config, tokens, valid, writer=None):
  """AdamW on eq. 1; returns (graphdef, params, final mean loss)."""
  tc = config.train
  model = TransformerLM(lm_config(config), rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  logging.info("LM: %d parameters", sum(x.size for x in jax.tree.leaves(params)))
  tx, lr = training.warmup_cosine_adamw(tc)
  opt_state = tx.init(params)
  tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)

  def step_fn(params, opt_state, key):
    idx = jax.random.randint(key, (tc.batch_size,), 0, tokens.shape[0])
    loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, tokens[idx], valid[idx]))(
        params
    )
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    mask = finite.nonfinite_mask({"loss": loss, "grad_norm": optax.tree.norm(grads)}, *new)
    if config.finite.policy == "skip":  # alignjax.finite eq. 3
      new = finite.select(mask, new, (params, opt_state))
    return *new, loss, mask

  step_fn = jax.jit(step_fn, donate_argnums=(0, 1))
  key = jax.random.key(config.seed)
  monitor = finite.Monitor.from_config(config.finite, unit="LM step")
  losses, masks, mean_loss = [], [], float("nan")
  for step in metrics.progress(range(tc.steps), desc="lm"):
    params, opt_state, loss, mask = step_fn(params, opt_state, jax.random.fold_in(key, step))
    losses.append(loss)
    masks.append(mask)
    if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
      monitor.check_steps(step + 2 - len(masks), masks)  # steps are counted from 1
      mean_loss = float(jnp.mean(jnp.stack(losses)))
      losses, masks = [], []
      if writer is not None:
        writer.write_scalars(step + 1, {"lm/loss": mean_loss, "lm/learning_rate": float(lr(step))})
  return graphdef, params, mean_loss


def completion_accuracy(graphdef, params, pairs, *, batch_size: int, max_operand: int):
  """Eq. 2 with greedy decoding; returns (accuracy, [(prompt, answer, completion)])."""
  max_new = len(str(2 * max_operand)) + 1
  cfg = sampling.SamplingConfig(
      max_new_tokens=max_new, temperature=0.0, eos_ids=(lang.EOS_ID,), pad_id=lang.PAD_ID
  )
  max_prompt = lang.max_sentence_length(max_operand) - len(str(2 * max_operand)) - 1
  rows = []
  for start in range(0, len(pairs), batch_size):
    chunk = list(pairs[start : start + batch_size])
    chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch size
    tokens, valid = convert.pad_left(
        [lang.encode(p) for p, _ in chunk],
        max_length=max_prompt,
        pad_id=lang.PAD_ID,
        length=max_prompt,
    )
    out = sampling.sample(
        graphdef,
        params,
        tokens,
        valid,
        jax.random.key(0),
        cfg,
        max_prompt_len=max_prompt,
        min_bucket=max_prompt,
    )
    for (p, a), ids in zip(chunk, np.asarray(out.tokens)):
      rows.append((p, a, lang.decode(ids)))
  rows = rows[: len(pairs)]
  return float(np.mean([c == a for _, a, c in rows])), rows


def pretrain(config, workdir: str) -> dict:
  """The whole run into `workdir`; returns the report (also written to report.json).

  Holds the workdir's lock meanwhile (alignjax.workdir); non-finite losses or weights stop
  the run before anything is saved (alignjax.finite).
  """
  validate(config)
  with workdir_lib.exclusive(workdir) as workdir:
    return _pretrain(config, workdir)


def _pretrain(config, workdir: str) -> dict:
  t_start = time.time()
  dc = config.data
  split = dict(max_operand=dc.max_operand, test_fraction=dc.test_fraction, seed=dc.split_seed)
  train_pairs, test_pairs = lang.equations("train", **split), lang.equations("test", **split)
  width = lang.max_sentence_length(dc.max_operand)
  tokens, valid = convert.pad_left(
      lang.sentences(train_pairs), max_length=width, pad_id=lang.PAD_ID, length=width
  )
  writer = metrics.MetricWriter(workdir)

  t0 = time.time()
  graphdef, params, final_loss = train(config, tokens, valid, writer)
  finite.check_host_tree(jax.device_get(params), "the pretrained LM")
  train_time = time.time() - t0

  t0 = time.time()
  rng = np.random.default_rng(config.seed)
  n = config.eval.num_examples
  pick = lambda pairs: [pairs[i] for i in rng.permutation(len(pairs))[:n]]
  kw = dict(batch_size=config.eval.batch_size, max_operand=dc.max_operand)
  test_acc, test_rows = completion_accuracy(graphdef, params, pick(test_pairs), **kw)
  train_acc, _ = completion_accuracy(graphdef, params, pick(train_pairs), **kw)
  eval_time = time.time() - t0
  writer.write_scalars(
      config.train.steps, {"eval/test_accuracy": test_acc, "eval/train_accuracy": train_acc}
  )
  writer.close()

  model_dir = os.path.join(workdir, MODEL_DIR)
  model = nnx.merge(graphdef, params)
  convert.save_hf_lm(model_dir, model, overwrite=True)
  lang.save_tokenizer(model_dir)

  report = {
      "test_accuracy": test_acc,
      "train_accuracy": train_acc,
      "final_loss": final_loss,
      "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "num_train_equations": len(train_pairs),
      "num_test_equations": len(test_pairs),
      "examples": [{"prompt": p, "answer": a, "completion": c} for p, a, c in test_rows[:10]],
      "targets_met": {"test_accuracy": test_acc >= config.targets.test_accuracy},
      "time_s": {"train": train_time, "eval": eval_time, "total": time.time() - t_start},
      "device": str(jax.devices()[0].platform),
      "model_dir": model_dir,
      "config": json.loads(config.to_json()),
  }
  with open(os.path.join(workdir, REPORT_NAME), "w") as f:
    json.dump(report, f, indent=2)
  return report


# ============================================================================ the cache


def default_config(arg=None, **overrides):
  """experiments/configs/pretrain_lm/tiny.py (its argument `arg`, e.g. "smoke=True"), with
  `config.train` fields overridden."""
  from experiments.configs.pretrain_lm import tiny

  config = tiny.get_config(arg or None)
  config.train.update(overrides)
  return config


def default_cache_dir(config) -> str:
  """$ALIGNJAX_CACHE/lm-<hash>, else ~/.cache/alignjax/lm-<hash>: one directory per config
  (the hash of the fields that make the model: seed, data, model, train; so references of
  several configs can be cached side by side)."""
  root = os.environ.get("ALIGNJAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "alignjax"
  )
  as_dict = json.loads(config.to_json())
  fields = {k: as_dict.get(k) for k in ("seed", "data", "model", "train")}
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(root, f"lm-{digest}")


def _cache_status(cache_dir: str, config) -> str | None:
  """None if cache_dir holds a complete run of `config` whose model loads; else the reason."""
  report_path = os.path.join(cache_dir, REPORT_NAME)
  if not os.path.isfile(report_path):
    return f"no {report_path}"
  try:
    with open(report_path) as f:
      report = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return f"unreadable {report_path}: {e}"
  refused, _ = run_identity.compare(
      {"config": report.get("config")}, {"config": json.loads(config.to_json())}
  )
  if refused:
    return f"{report_path} was made with a different config ({'; '.join(refused[:3])})"
  try:
    convert.read_hf_config(os.path.join(cache_dir, MODEL_DIR))
  except (OSError, ValueError) as e:
    return f"the model in {cache_dir} does not load: {e}"
  return None


def ensure_pretrained(cache_dir: str | None = None, config=None) -> dict:
  """The embedded LM pretrained with `config` (default: tiny.py), pretraining it if needed.

  Returns dict(model_dir=<HF model + tokenizer directory>, report=<its report.json>).
  In a multi-process job process 0 pretrains (cache_dir on a shared file system) while the
  others wait at a barrier.
  """
  config = default_config() if config is None else config
  cache_dir = os.fspath(cache_dir or default_cache_dir(config))
  if jax.process_index() == 0:
    reason = _cache_status(cache_dir, config)
    if reason is not None:
      logging.info("Pretraining the embedded LM into %s (%s).", cache_dir, reason)
      pretrain(config, cache_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("alignjax_ensure_pretrained_lm")
  return {
      "model_dir": os.path.join(cache_dir, MODEL_DIR),
      "report": os.path.join(cache_dir, REPORT_NAME),
  }


# ============================================================================ command line


def define_flags(flag_values=flags.FLAGS):
  """--config (ml_collections config file, locked) and --workdir, on `flag_values`."""
  config = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file.", flag_values=flag_values, lock_config=True
  )
  workdir = flags.DEFINE_string(
      "workdir", None, "Output directory (model, report, logs).", flag_values=flag_values
  )
  return config, workdir


def main(argv, config_flag, workdir_flag) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if config_flag.value is None or workdir_flag.value is None:
    raise app.UsageError(
        "--config and --workdir are required, e.g. "
        "--config=experiments/configs/pretrain_lm/tiny.py --workdir=runs/lm"
    )
  if not workdir_flag.value.strip():
    raise app.UsageError("--workdir is empty: give the output directory (model, report, logs)")
  with scripts.exit_on_run_errors():
    report = pretrain(config_flag.value, workdir_flag.value)
  print(
      json.dumps(
          {
              k: report[k]
              for k in ("test_accuracy", "train_accuracy", "final_loss", "targets_met", "time_s")
          },
          indent=2,
      ),
      flush=True,
  )
  print(f"model, tokenizer and report in {workdir_flag.value}", flush=True)


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, *_FLAGS), flags_parser=configs.flags_parser)
