r"""Pretrain the embedded digits diffusion model and the digits classifier.

  python -m experiments.pretrain_diffusion --config=experiments/configs/pretrain_diffusion/digits.py --workdir=runs/pretrain_digits

The command line of `alignjax.diffusion.digits_pretraining.pretrain`: data → UNet training
(jit, donated) → classifier training → class-conditional samples → recognition rate → both
models + report.json saved into --workdir. The losses, EMA, samplers and recognition rate are
in alignjax.diffusion.digits_training (equations there); the config files build on
`digits_pretraining.default_config`. Experiments that need the pretrained models call
`digits_pretraining.ensure_pretrained`, which runs the same pretraining only when the cache
lacks valid models for the requested config.

Without --workdir the models go to the default cache of the config's objective
(`default_cache_dir`: $ALIGNJAX_CACHE or ~/.cache/alignjax/digits, and its flow/ for the
flow model), where `ensure_pretrained` finds them. Cache layout: unet/ and classifier/
(config.json + model.safetensors), report.json (written last: marks a complete run),
metrics.jsonl, images/.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from alignjax import configs, scripts
from alignjax.diffusion import digits_pretraining

scripts.make_importable(__file__, __package__)


# ============================================================================ command line


def define_flags(flag_values=flags.FLAGS, argv=None):
  """--config (ml_collections config file, locked) and --workdir, on `flag_values`.

  Defined only when the script runs (not on import), so that importing the script defines no
  flags. `argv` (default sys.argv) is where ml_collections looks for the `--config.a.b=v`
  overrides.
  """
  config = config_flags.DEFINE_config_file(
      "config",
      None,
      "Experiment config file.",
      flag_values=flag_values,
      lock_config=True,
      sys_argv=argv,
  )
  workdir = flags.DEFINE_string(
      "workdir",
      None,
      "Output directory (models, report, logs). Default: the digits cache "
      "($ALIGNJAX_CACHE or ~/.cache/alignjax/digits).",
      flag_values=flag_values,
  )
  return config, workdir


def main(argv, config_flag, workdir_flag) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if config_flag.value is None:
    raise app.UsageError(
        "--config is required, e.g. " "--config=experiments/configs/pretrain_diffusion/digits.py"
    )
  workdir = workdir_flag.value
  if workdir is None:
    workdir = digits_pretraining.default_cache_dir(
        digits_pretraining.objective_of(config_flag.value)
    )
  if not workdir.strip():
    raise app.UsageError("--workdir is empty: give the output directory, or leave the flag out")
  with scripts.exit_on_run_errors():
    report = digits_pretraining.pretrain(config_flag.value, workdir)
  summary = {
      k: report[k]
      for k in ("classifier_test_accuracy", "recognition_rate", "targets_met", "time_s")
  }
  print(json.dumps(summary, indent=2), flush=True)
  print(f"models and report in {workdir}", flush=True)


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, *_FLAGS), flags_parser=configs.flags_parser)
