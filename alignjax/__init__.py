"""alignjax: aligning generative models with rewards and preferences, in JAX/Flax NNX.

The curated public API. Subpackages: `alignjax.diffusion` (schedules, DDIM and flow
samplers), `alignjax.models` (UNet, classifier, decoder LMs, LoRA, checkpoint conversion),
`alignjax.rewards`, `alignjax.algorithms` (ddpo, draft, adjoint_matching, dpo,
policy_gradient, preference_model), `alignjax.lm` (sampling, scoring, rollouts), `alignjax.judges`
(programmatic and learned judges of LM completions) and `alignjax.data`.
"""

from alignjax import checkpoint, configs, finite, judges, metrics, parallel, training, workdir
from alignjax.checkpoint import CheckpointDamagedError, Checkpointer, CheckpointError
from alignjax.configs import ConfigError, parse_arg
from alignjax.finite import NonFiniteError
from alignjax.judges import Completions, Judge
from alignjax.metrics import MetricWriter, progress
from alignjax.parallel import (
    DATA_AXES,
    batch_sharding,
    initialize_distributed,
    is_main_process,
    make_mesh,
    param_shardings,
    replicated,
    shard_batch,
    sharded_init,
)
from alignjax.training import Finetune, OptimizerConfig, TrainState, make_optimizer
from alignjax.workdir import WorkdirError

__version__ = "0.1.0"

__all__ = [
    "CheckpointDamagedError",
    "Completions",
    "Judge",
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "DATA_AXES",
    "Finetune",
    "MetricWriter",
    "NonFiniteError",
    "OptimizerConfig",
    "TrainState",
    "WorkdirError",
    "batch_sharding",
    "checkpoint",
    "configs",
    "finite",
    "initialize_distributed",
    "is_main_process",
    "judges",
    "make_mesh",
    "make_optimizer",
    "metrics",
    "parallel",
    "param_shardings",
    "parse_arg",
    "progress",
    "replicated",
    "shard_batch",
    "sharded_init",
    "training",
    "workdir",
]
