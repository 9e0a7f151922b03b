"""What the LM alignment scripts share: the reference policy, the embedded prompts, the
judge and the win-rate evaluation. Library code lives in `alignjax`; this module only wires it
to the scripts' configs."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignjax import checkpoint, configs, finite, judges, metrics, parallel, training
import alignjax.data as data_lib
from alignjax.data import synthetic_language as lang
from alignjax.lm import sampling
from alignjax.models import convert
from alignjax.models import lm as lm_lib

from experiments import common

JUDGES = ("arithmetic", "raters", "reward_model")


@dataclasses.dataclass(frozen=True)
class Reference:
  """The frozen reference policy π_ref (also the initial policy and LoRA's base)."""

  graphdef: nnx.GraphDef
  params: nnx.State
  model_dir: str
  metadata: dict  # the run identity of the base model (alignjax.checkpoint)


def load_reference(config, mesh) -> Reference:
  """`config.reference.model_dir` (an HF LM directory), or the embedded LM pretrained by
  experiments/configs/pretrain_lm/tiny.py (its argument `reference.pretrain_arg`) for
  `reference.pretrain_steps` steps, cached (experiments.pretrain_lm.ensure_pretrained)."""
  model_dir = config.reference.model_dir
  if not model_dir:
    from experiments import pretrain_lm  # pretrains on first use

    pretrain_config = pretrain_lm.default_config(
        config.reference.pretrain_arg, steps=config.reference.pretrain_steps
    )
    model_dir = pretrain_lm.ensure_pretrained(config.reference.cache_dir or None, pretrain_config)[
        "model_dir"
    ]
  if not os.path.isdir(model_dir):
    raise configs.ConfigError(
        f"config.reference.model_dir={model_dir!r} is not a directory (a Hugging Face LM "
        "checkpoint: config.json + *.safetensors); leave it empty for the embedded LM"
    )
  model, _ = convert.load_hf_lm(model_dir, mesh=mesh)
  graphdef, params = nnx.split(model)
  return Reference(graphdef, params, model_dir, checkpoint.frozen_model_metadata(model_dir))


def sharding_rules(config):
  """`config.sharding_rules` when given, else the LM rules (`alignjax.models.lm`: FSDP over the
  hidden axis, tensor parallelism over heads, MLP width and vocabulary), which reach the
  parameters, the LoRA base and the Adam moments of a TrainState alike."""
  rules = config.get("sharding_rules")
  return [tuple(rule) for rule in rules] if rules else lm_lib.lm_sharding_rules()


def embedded_prompts(config, split: str) -> list[str]:
  """Prompt texts "a op b=" of the synthetic language's `split`."""
  dc = config.data
  pairs = lang.equations(
      split, max_operand=dc.max_operand, test_fraction=dc.test_fraction, seed=dc.split_seed
  )
  return [p for p, _ in pairs]


def _embedded_prompt_set(config, split: str) -> data_lib.PromptSet:
  texts = embedded_prompts(config, split)
  return data_lib.prompt_set_from_ids(
      [lang.encode(t) for t in texts],
      max_length=prompt_width(config),
      pad_id=lang.PAD_ID,
      records=[{"prompt": t} for t in texts],
  )


def _file_prompt_set(config, path: str) -> data_lib.PromptSet:
  dc = config.data
  return data_lib.load_prompts(
      path,
      convert.load_tokenizer(config.reference.model_dir),
      max_length=int(dc.max_prompt_length),
      key=dc.get("prompt_key", "prompt"),
      on_too_long=dc.get("on_too_long", "error"),
  )


def uses_files(config) -> bool:
  """Whether the run reads its data from files (else: the embedded synthetic language)."""
  return bool(config.data.get("prompts") or config.data.get("preferences"))


def train_prompt_set(config) -> data_lib.PromptSet:
  """`config.data.prompts` (a JSONL or text file, tokenised by the reference's tokenizer, its
  chat template for `messages` records; `data.max_prompt_length`, `data.on_too_long`), or the
  synthetic language's training equations when it is empty."""
  if config.data.get("prompts"):
    return _file_prompt_set(config, config.data.prompts)
  return _embedded_prompt_set(config, "train")


def eval_prompt_set(config) -> data_lib.PromptSet:
  """Held-out prompts of the win-rate evaluation: `config.data.eval_prompts`, or the synthetic
  language's held-out equations when the run uses no files."""
  if config.data.get("eval_prompts"):
    return _file_prompt_set(config, config.data.eval_prompts)
  if uses_files(config):
    raise configs.ConfigError(
        "config.data.eval_prompts is empty: a run on data files needs held-out prompts for "
        "the win-rate evaluation too (a JSONL or text file)"
    )
  return _embedded_prompt_set(config, "test")


def prompt_iterator(config, prompt_set, global_batch_size: int) -> data_lib.BatchIterator:
  """Seeded epochs of global prompt batches; every process draws the whole global batch (the
  sampler shards its rows over the mesh), so the iterator's state is the same everywhere."""
  return data_lib.BatchIterator(
      prompt_set, global_batch_size, seed=config.seed, process_index=0, process_count=1
  )


def prompt_width(config) -> int:
  """Tokens of the longest embedded prompt ("<bos> a op b =")."""
  digits = len(str(config.data.max_operand))
  return 1 + 2 * digits + 2


def encode_prompts(texts, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (tokens, valid) [B, width] of prompt texts in the synthetic language."""
  return convert.pad_left(
      [lang.encode(t) for t in texts], max_length=width, pad_id=lang.PAD_ID, length=width
  )


def sampling_config(section, *, temperature: float | None = None) -> sampling.SamplingConfig:
  """The SamplingConfig of `config.sampling` (EOS and padding of the synthetic language)."""
  return sampling.SamplingConfig(
      max_new_tokens=int(section.max_new_tokens),
      temperature=float(section.temperature if temperature is None else temperature),
      top_k=int(section.top_k),
      top_p=float(section.top_p),
      eos_ids=(lang.EOS_ID,),
      pad_id=lang.PAD_ID,
  )


def host(x) -> np.ndarray:
  """The whole of a (possibly multi-process) array on this host."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def decode_texts(tokens, valid) -> list[str]:
  """Texts of rows of token ids (invalid slots dropped; decoding stops at EOS)."""
  tokens, valid = host(tokens), host(valid)
  return [lang.decode(t[v]) for t, v in zip(tokens, valid)]


def completions(r) -> judges.Completions:
  """The prompts and responses of a Rollout as whole host arrays, for a judge."""
  return judges.Completions(
      host(r.prompt_tokens), host(r.prompt_valid), host(r.tokens), host(r.valid)
  )


def make_judge(section, mesh=None) -> judges.Judge:
  """The judge named by `config.judge.name` (JUDGES):

  arithmetic    synthetic_language eq. 3 of the decoded completion (scale `judge.scale`),
                P(a ≻ b) = σ((r_a − r_b) / T) with T = `judge.temperature` (0: hard 1/0/½)
  reward_model  a transformers sequence-classification reward model in `judge.model_dir`,
                P(a ≻ b) = σ(r(x, a) − r(x, b)) (Bradley–Terry)
  """
  if section.name == "arithmetic":
    reward = functools.partial(lang.arithmetic_reward, scale=float(section.scale))
    return judges.RewardFunctionJudge(reward, lang.decode, temperature=section.temperature)
  if section.name == "raters":
    return judges.PreferenceFunctionJudge(lang.rater_preference, lang.decode)
  if section.name == "reward_model":
    if not section.get("model_dir") or not os.path.isdir(section.model_dir):
      raise configs.ConfigError(
          f"config.judge.model_dir={section.get('model_dir')!r}: judge 'reward_model' needs "
          "the directory of a transformers sequence-classification checkpoint"
      )
    model, _ = convert.load_hf_reward(section.model_dir)
    return judges.RewardModelJudge(*nnx.split(model))
  raise configs.ConfigError(f"config.judge.name={section.name!r}: valid choices are {JUDGES}")


def make_init_state(finetune, optimizer, plan, key):
  """`ref_params -> TrainState` of the trainable parameters: a copy of the reference (full
  fine-tuning; the state is donated, the reference stays) or fresh LoRA factors over it."""

  def init_state(ref_params):
    trainable, _ = finetune.split(ref_params, key, plan)
    if finetune.mode == "full":
      trainable = jax.tree.map(jnp.copy, trainable)
    return training.TrainState.create(trainable, optimizer, key)

  return init_state


def write_summary(
    workdir: str, name: str, host: dict, rows: dict, config, *, unit: str, notes=(), fields=None
) -> str:
  """Prints and saves the reference vs fine-tuned table (summary.md, summary.json with
  `fields`) and the held-out win-rate curve; `rows` {label: evaluation dict}."""
  row = lambda label, e: (
      f"| {label} | {e['win_rate']:.3f} | {e.get('reward', np.nan):.3f} | "
      f"{e.get('accuracy', np.nan):.3f} |"
  )
  table = "\n".join(
      [
          f"| policy (eval: {config.eval.num_prompts} held-out prompts, T="
          f"{config.eval.temperature}) | win rate vs reference | mean reward | exact answers |",
          "|---|---|---|---|",
          row("reference", host["base"]),
          *(row(label, e) for label, e in rows.items()),
          *(["", *notes] if notes else []),
      ]
  )
  print(table, flush=True)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(
        {**(fields or {}), "base": host["base"], "eval_history": host["eval_history"]},
        f,
        indent=2,
    )
  history = np.asarray(host["eval_history"], np.float64).reshape(-1, 3)
  metrics.plot_curves(
      os.path.join(workdir, "win_rate_curve.png"),
      {"win rate vs reference (held-out)": (history[:, 0], history[:, 1])},
      xlabel=unit,
      ylabel="win rate",
      title=name,
  )
  return table


def check_judge(p) -> None:
  """The judge's probabilities lie in [0, 1] (checked on every batch; antisymmetry, eq. 1 of
  `alignjax.judges`, is checked on the first evaluation's sample by `judges.check_judge`)."""
  p = np.asarray(p)
  if not np.all((p >= 0) & (p <= 1)):
    bad = p[~((p >= 0) & (p <= 1))]
    raise ValueError(f"the judge returned probabilities outside [0, 1]: {bad[:5]}")


def evaluate(policy_sample, reference_sample, judge) -> dict:
  """Win rate of the policy's responses over the reference's on the same prompts (the
  judge's P(policy ≻ reference), ties ½), and the mean reward and exact-answer rate (reward
  1, the arithmetic judge's top score) of each."""
  policy_sample, reference_sample = completions(policy_sample), completions(reference_sample)
  win = np.asarray(judge.win_probability(policy_sample, reference_sample))
  if not judge.has_reward:  # a pure preference judge: the win rate only
    return {"win_rate": float(np.mean(win))}
  r_policy = np.asarray(judge.reward(policy_sample))
  r_ref = np.asarray(judge.reward(reference_sample))
  return {
      "win_rate": float(np.mean(win)),
      "reward": float(np.mean(r_policy)),
      "reference_reward": float(np.mean(r_ref)),
      "accuracy": float(np.mean(r_policy == 1.0)),
      "reference_accuracy": float(np.mean(r_ref == 1.0)),
  }


def global_rows(x, mesh) -> jax.Array:
  """A host array that every process holds whole (e.g. the judge's verdicts) as one global
  array with its rows sharded over the mesh's data axes."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, parallel.batch_sharding(mesh), lambda i: x[i])


def export(workdir: str, graphdef, finetune, trainable, lora_base, reference_dir) -> str:
  """The fine-tuned policy (LoRA merged) as a Hugging Face LM directory with the reference's
  tokenizer files, <workdir>/final_model. Call it on every process (the parameters are
  gathered); process 0 writes."""
  params = common.to_host_tree(jax.jit(finetune.params)(trainable, lora_base))
  finite.check_host_tree(params, "the fine-tuned policy")
  out = os.path.join(workdir, "final_model")
  if parallel.is_main_process():
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    convert.save_hf_lm(out, model, overwrite=True)
    convert.copy_tokenizer_files(reference_dir, out)
  return out


__all__ = [
    "JUDGES",
    "Reference",
    "check_judge",
    "completions",
    "decode_texts",
    "embedded_prompts",
    "encode_prompts",
    "evaluate",
    "export",
    "global_rows",
    "host",
    "load_reference",
    "make_init_state",
    "write_summary",
    "make_judge",
    "prompt_iterator",
    "eval_prompt_set",
    "train_prompt_set",
    "uses_files",
    "prompt_width",
    "sampling_config",
    "sharding_rules",
]
