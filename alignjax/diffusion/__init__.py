"""Diffusion core: noise schedules, DDIM/DDPM samplers with per-step log-probabilities, and
flow matching with ODE/SDE samplers (`alignjax.diffusion.flow`)."""

from alignjax.diffusion import flow
from alignjax.diffusion.samplers import (
    DDIMStepOutput,
    EpsFn,
    Trajectory,
    Transitions,
    classifier_free_guidance,
    ddim_std,
    ddim_step,
    fixed_order_sum,
    gaussian_log_prob,
    sample,
    step_log_prob,
    transitions,
)
from alignjax.diffusion.schedules import (
    KINDS,
    NoiseSchedule,
    add_noise,
    alpha_cumprod_at,
    expand_like,
    inference_prev_timesteps,
    inference_timesteps,
    make_schedule,
)

__all__ = [
    "flow",
    "DDIMStepOutput",
    "EpsFn",
    "KINDS",
    "NoiseSchedule",
    "Trajectory",
    "Transitions",
    "add_noise",
    "alpha_cumprod_at",
    "classifier_free_guidance",
    "ddim_std",
    "ddim_step",
    "expand_like",
    "fixed_order_sum",
    "gaussian_log_prob",
    "inference_prev_timesteps",
    "inference_timesteps",
    "make_schedule",
    "sample",
    "step_log_prob",
    "transitions",
]
