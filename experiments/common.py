"""Pieces the diffusion experiment scripts share: models, rewards, host transfers, summaries."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from concurrent import futures

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache

from alignjax import checkpoint, configs, finite, parallel, rewards, scripts, testing, training
from alignjax.data import diffusion_prompts
from alignjax.diffusion import backend as backend_lib
from alignjax.diffusion import digits_pretraining, pipeline, schedules
from alignjax.models import classifier as classifier_lib
from alignjax.models import io as model_io
from alignjax.models import unet as unet_lib
from alignjax.rewards import configured

MODEL_INITS = ("pretrained", "random")
RANDOM_PRESETS = ("tiny",)
FAMILIES = backend_lib.FAMILIES
REWARDS_BY_FAMILY = configured.REWARDS
NUM_CLASSES = 10


def family(config) -> str:
  """The base model family: config.model.family, "digits" when the config predates it."""
  return config.model.get("family", "digits")


def validate_model_and_reward(config) -> None:
  """The model and reward keys, for the digits model or a Stable Diffusion pipeline."""
  configs.check_choice(config, "model.family", FAMILIES) if "family" in config.model else None
  configs.check_choice(config, "reward.name", REWARDS_BY_FAMILY[family(config)])
  if family(config) == "digits":
    configs.check_choice(config, "model.init", MODEL_INITS)
    configs.check_choice(config, "model.random_preset", RANDOM_PRESETS)
    if config.reward.name == "classifier" and not -1 <= config.reward.target < NUM_CLASSES:
      raise configs.ConfigError(
          f"config.reward.target={config.reward.target}: valid choices are -1 (the prompt's "
          f"digit) or a digit 0..{NUM_CLASSES - 1}"
      )
  else:
    path = config.model.get("path", "")
    if not path or not os.path.isdir(path):
      raise configs.ConfigError(
          f"config.model.path={path!r}: must be a diffusers Stable Diffusion pipeline "
          "directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
      )
    configs.check_choice(config, "model.compute_dtype", pipeline.COMPUTE_DTYPES)
  if config.reward.name.startswith("jpeg"):
    configs.check_positive(config, "reward.jpeg_quality", "reward.jpeg_upscale")
  if config.mesh.get("tensor", 1) not in (1, -1):
    raise configs.ConfigError(
        f"config.mesh.tensor={config.mesh.tensor}: the diffusion models are not sharded over "
        "a tensor axis; use mesh.fsdp to shard parameters and optimizer state (and mesh.data "
        "for the batch)"
    )


def prompt_list(config) -> list[str]:
  """The text prompts of config.prompts: a shipped set (`set`) or a file (`file`: .txt or
  .jsonl), each formatted with `template` (alignjax.data.diffusion_prompts)."""
  cfg = config.prompts
  if cfg.get("file"):
    subjects = diffusion_prompts.load_prompt_file(cfg.file)
  else:
    subjects = diffusion_prompts.prompt_set(cfg.set)
  return diffusion_prompts.format_prompts(subjects, cfg.get("template", "{}"))


def base_schedule(config) -> schedules.NoiseSchedule:
  """The base model's noise schedule, before any model is loaded (for validation): the
  digits UNet's (linear) or the pipeline directory's scheduler config."""
  if family(config) == "digits":
    return schedules.make_schedule("linear")
  from alignjax.models.convert import sd_pipeline

  path = os.path.join(config.model.path, "scheduler", sd_pipeline.SCHEDULER_FILE)
  with open(path) as f:
    return sd_pipeline.schedule_from_diffusers(json.load(f), path)[0]


def _digits_export(directory: str, unet) -> None:
  model_io.save_model(directory, unet, unet.config)


def load_backend(config, mesh=None, rules=None):
  """(backend, reward): the base model behind `alignjax.diffusion.backend`'s interface and
  the configured reward (`alignjax.rewards.configured.ParamReward`, weights as arguments)."""
  if family(config) == "stable_diffusion":
    sampling = pipeline.SamplingConfig(
        num_steps=config.sampling.num_steps,
        guidance_scale=config.sampling.guidance_scale,
        height=config.model.get("height") or None,
        width=config.model.get("width") or None,
        compute_dtype=config.model.get("compute_dtype", "float32"),
        clip_skip=config.model.get("clip_skip") or None,
    )
    reward = configured.make_reward(config.reward, "stable_diffusion")
    backend = backend_lib.load_stable_diffusion_backend(
        config.model.path,
        prompt_list(config),
        sampling=sampling,
        remat=bool(config.model.get("remat", False)),
        variant=config.model.get("variant") or None,
        mesh=mesh,
        rules=rules,
        extra_inputs=reward.extra_inputs,
    )
    return backend, reward
  models = load_diffusion_models(config, mesh)
  backend = backend_lib.digits_backend(models.unet, models.schedule, models.base, _digits_export)
  return backend, configured.make_reward(config.reward, "digits", classifier=models.classifier)


@dataclasses.dataclass
class DiffusionModels:
  unet: nnx.Module
  classifier: nnx.Module
  schedule: schedules.NoiseSchedule
  image_shape: tuple[int, int, int]
  num_classes: int
  base: dict  # what the checkpoint metadata records about the frozen models (UNet, classifier)


def load_diffusion_models(config, mesh=None) -> DiffusionModels:
  """The base UNet, the digits classifier and the noise schedule the UNet was trained with."""
  if config.model.init == "random":
    unet = testing.tiny_unet(seed=config.seed)
    classifier = testing.tiny_classifier(seed=config.seed + 1)
    schedule = schedules.make_schedule("linear")
    base = {"init": "random", "preset": config.model.random_preset, "seed": config.seed}
  else:
    paths = digits_pretraining.ensure_pretrained(config.model.cache_dir or None)  # pretrains once
    unet = model_io.load_model(paths["unet_dir"], unet_lib.UNet, unet_lib.UNetConfig)
    classifier = model_io.load_model(
        paths["classifier_dir"], classifier_lib.DigitsClassifier, classifier_lib.ClassifierConfig
    )
    schedule = schedules.make_schedule(**paths["schedule"])
    base = {
        "init": "pretrained",
        **checkpoint.frozen_model_metadata(paths["unet_dir"]),
        "classifier": checkpoint.frozen_model_metadata(paths["classifier_dir"]),  # the reward's
    }
  if mesh is not None:  # the base weights live sharded from the start
    graphdef, state = nnx.split(unet)
    unet = nnx.merge(graphdef, jax.device_put(state, parallel.param_shardings(state, mesh)))
  cfg = unet.config
  return DiffusionModels(
      unet=unet,
      classifier=classifier,
      schedule=schedule,
      image_shape=(cfg.image_size, cfg.image_size, cfg.in_channels),
      num_classes=cfg.num_classes,
      base=base,
  )


def check_eval_batches(config) -> None:
  """Evaluation samples in training-sized batches: eval.num_samples % sampling.batch_size == 0."""
  configs.check_divisible(
      config,
      "eval.num_samples",
      config.sampling.batch_size,
      "sampling.batch_size: evaluation samples in training-sized batches",
  )


def to_host(x: jax.Array) -> np.ndarray:
  """The whole (possibly multi-host sharded) array as numpy on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host_tree(tree):
  return jax.tree_util.tree_map(to_host, tree)


def export_finetuned(
    workdir: str, graphdef, export, trainable, frozen, finetune: training.Finetune
):
  """Saves the trainable leaves (final_params.npz) and the merged model (final_model/):
  `export(directory, model)` writes the family's format (a backend's `export`), or `export`
  is the digits UNet's config.

  Raises NonFiniteError, writing nothing, if any value is NaN or infinite.
  """
  finite.check_host_tree(trainable, "export of the fine-tuned parameters")
  leaves, _ = parallel.flatten_with_paths(trainable)
  np.savez(os.path.join(workdir, "final_params.npz"), **dict(leaves))
  model = nnx.merge(graphdef, finetune.params(trainable, frozen))
  directory = os.path.join(workdir, "final_model")
  if callable(export):
    export(directory, model)
  else:
    model_io.save_model(directory, model, export)


class _Done:

  def __init__(self, value):
    self._value = value

  def result(self):
    return self._value


class RewardEvaluator:
  """Rewards for sampled images as float32 numpy [B], identical on every process.

  Differentiable rewards run jitted on the device, their weights passed as an argument
  (`configured.ParamReward`); host rewards (JPEG) run in a worker thread (`submit`) so that
  the device goes on sampling the next batch meanwhile. In a multi-host job each process
  scores its share of the batch and the rewards are all-gathered.
  """

  def __init__(self, reward, mesh):
    if isinstance(reward, rewards.Reward):  # weights (if any) already bound
      bound = reward
      reward = configured.ParamReward(
          bound.name, lambda params, images, cond: bound.fn(images, cond), {}, bound.differentiable
      )
    if reward.differentiable and mesh is not None:  # the weights live on the run's devices
      reward = dataclasses.replace(
          reward, params=jax.device_put(reward.params, parallel.replicated(mesh))
      )
    self.reward = reward
    self.name = reward.name
    self._host_reward = None if reward.differentiable else reward.bind()
    self._device_fn = jax.jit(reward.fn) if reward.differentiable else None
    self._pool = None if reward.differentiable else futures.ThreadPoolExecutor(max_workers=1)

  def _host_rewards(self, images) -> np.ndarray:
    images = to_host(images)
    n, pid, count = images.shape[0], jax.process_index(), jax.process_count()
    lo, hi = n * pid // count, n * (pid + 1) // count
    local = np.asarray(rewards.evaluate_reward(self._host_reward, images[lo:hi]), np.float32)
    if count == 1:
      return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))

  def submit(self, images, cond):
    if self._device_fn is not None:
      out = self._device_fn(self.reward.params, images, cond)
      return _Done(to_host(out).astype(np.float32))
    return self._pool.submit(self._host_rewards, images)

  def __call__(self, images, cond) -> np.ndarray:
    return self.submit(images, cond).result()


def check_state_fits(trees, shardings) -> int:
  """Stops a run whose train state and frozen weights alone overflow a device (known only on
  accelerators), before compiling; returns their per-device bytes."""
  return parallel.check_fits_in_memory(
      "the train state and frozen weights",
      trees,
      shardings,
      hint=(
          "shard them over more devices (mesh.fsdp), fine-tune LoRA factors "
          "(finetune.mode=lora), or read the per-device table of "
          "`python -m benchmarks.sd_memory_plan`"
      ),
  )


def sharding_rules(config):
  """Parameter sharding rules from `config.sharding_rules`, else the library's FSDP default."""
  rules = config.get("sharding_rules")
  return [tuple(rule) for rule in rules] if rules else None


def validate_run_safety(config) -> None:
  """The optimizer's numbers are finite and in range; the finite-check and damage policies."""
  configs.check_optimizer(config)
  finite.validate_config(config)
  configs.check_choice(config, "checkpoint.on_damage", checkpoint.ON_DAMAGE)


def make_checkpointer(config, workdir: str, script: str, models):
  """The run's Checkpointer: run identity = the script, the full config and the base model
  (`models.base`: a backend's or DiffusionModels' metadata).

  The caller installs the preemption handler once the checkpoint (if any) is restored.
  """
  ckpt = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      save_every=config.checkpoint.every,
      keep=config.checkpoint.keep,
      metadata=checkpoint.run_metadata(script, config, base_model=models.base),
      on_damage=config.checkpoint.on_damage,
  )
  return ckpt


def check_finite(monitor: finite.Monitor, step: int, mask, ckpt, writer) -> bool:
  """`monitor.check(step, mask)`; before a NonFiniteError propagates, the checkpointer is
  closed (pending saves finish, signal handlers are restored) and the writer flushed."""
  try:
    return monitor.check(step, mask)
  except finite.NonFiniteError:
    ckpt.close()
    writer.close()
    raise


def write_summary(
    workdir: str,
    method: str,
    reward_name: str,
    host: dict,
    final_reward: float,
    config,
    *,
    eval_history=(),
) -> str:
  """Prints and saves the before/after table (`method` names the fine-tuned row) and the
  reward curve (process 0 only).

  `host["history"]` holds the per-round training means [[round, reward]]; `eval_history` the
  held-out points [[round, reward]] on config.eval.curve_samples fixed seeds (see
  plot_reward_curve).
  """
  table = "\n".join(
      [
          f"| model (eval: {config.eval.num_samples} held-out seeds) | mean {reward_name} reward |",
          "|---|---|",
          f"| base | {host['base_reward']:.4f} |",
          f"| {method}, {config.num_rounds} rounds | {final_reward:.4f} |",
      ]
  )
  print(table, flush=True)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(
        {
            "method": method,
            "base_reward": host["base_reward"],
            "final_reward": final_reward,
            "reward": reward_name,
            "rounds": config.num_rounds,
            "eval_history": [list(point) for point in eval_history],
        },
        f,
        indent=2,
    )
  num_seeds = config.eval.get("curve_samples", config.eval.num_samples)
  endpoints = None
  if num_seeds != config.eval.num_samples:
    endpoints = (
        [0, config.num_rounds],
        [host["base_reward"], final_reward],
        f"held-out, all {config.eval.num_samples} seeds (summary table)",
    )
  plot_reward_curve(
      os.path.join(workdir, "reward_curve.png"),
      host["history"],
      eval_history,
      ylabel=f"mean {reward_name} reward",
      eval_label=f"held-out ({num_seeds} fixed seeds)",
      endpoints=endpoints,
      title=f"{method}: {reward_name} reward",
  )
  return table


def moving_average(values, window: int) -> np.ndarray:
  """Centred moving average: s_t = mean(v_{t−h} … v_{t+h}), h = window // 2, the window cut
  short at both ends (so s has no lag behind a trend, unlike an exponential average)."""
  values = np.asarray(values, np.float64)
  h = max(int(window), 1) // 2
  sums = np.concatenate([[0.0], np.cumsum(values)])
  lo = np.maximum(np.arange(len(values)) - h, 0)
  hi = np.minimum(np.arange(len(values)) + h + 1, len(values))
  return (sums[hi] - sums[lo]) / (hi - lo)


def plot_reward_curve(
    path: str,
    train_history,
    eval_history,
    *,
    ylabel: str,
    eval_label: str = "held-out",
    endpoints=None,
    title: str | None = None,
    window: int = 5,
) -> str:
  """PNG of a reward curve: held-out points [[step, reward]] drawn bold, the noisy per-round
  training means [[step, reward]] faint, with their centred moving average over `window`
  rounds; `endpoints` = (steps, values, label) adds markers (e.g. the full evaluation before and
  after training). Either history may be empty."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7.0, 4.5), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  if len(train_history):
    steps, values = (np.asarray(v) for v in zip(*train_history))
    ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=1, label="train batch mean (per round)")
    smoothed = moving_average(values, window)
    ax.plot(steps, smoothed, color="tab:blue", lw=1.8, label=f"train, {window}-round average")
  if len(eval_history):
    steps, values = (np.asarray(v) for v in zip(*eval_history))
    ax.plot(steps, values, color="tab:red", lw=2.5, marker="o", ms=7, label=eval_label, zorder=3)
  if endpoints is not None:
    steps, values, label = endpoints
    ax.plot(steps, values, ls="none", marker="D", ms=8, mfc="none", mec="k", label=label, zorder=4)
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, format="png")
  return path


def run_experiment_cli(run_fn) -> None:
  """The command line of an experiment script: `run_fn(config, workdir)` under absl.

  --config (an ml_collections config file, locked; `--config.a.b=v` overrides) and
  --workdir are defined here, when the script runs, not when it is imported: a module that
  imports several experiment scripts (the reproduction tables, tests) defines no flag twice.
  """
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file.", lock_config=True
  )
  workdir_flag = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if config_flag.value is None:
      raise app.UsageError("--config is required (an experiments/configs/<family>/<name>.py)")
    if workdir_flag.value is None:
      raise app.UsageError("--workdir is required (checkpoints, logs and images go there)")
    if not workdir_flag.value.strip():
      raise app.UsageError(
          "--workdir is empty: give the directory for checkpoints, logs and images"
      )
    with scripts.exit_on_run_errors():  # the message says it all: no traceback, status 1
      run_fn(config_flag.value, workdir_flag.value)

  app.run(main, flags_parser=configs.flags_parser)


@contextlib.contextmanager
def persistent_compilation_cache(directory: str):
  """JAX's persistent compilation cache in `directory` for everything compiled meanwhile
  (no minimum compile time or size); the previous settings are restored afterwards."""
  settings = {
      "jax_compilation_cache_dir": directory,
      "jax_persistent_cache_min_compile_time_secs": 0.0,
      "jax_persistent_cache_min_entry_size_bytes": -1,
  }
  previous = {name: getattr(jax.config, name) for name in settings}
  os.makedirs(directory, exist_ok=True)
  compilation_cache.reset_cache()  # reopens at `directory` on the next compilation
  for name, value in settings.items():
    jax.config.update(name, value)
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
