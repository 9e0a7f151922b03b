"""Pieces the Stable Diffusion benchmarks share: SD 1.5's DDIM scheduler settings and a torch
state dict as a checkpoint alignjax's key tables read."""


def sd_scheduler_config() -> dict:
  """diffusers.DDIMScheduler kwargs of SD 1.5 (alignjax.diffusion.full_size.SD15_SCHEDULE)."""
  from alignjax.diffusion.full_size import SD15_SCHEDULE  # pylint: disable=import-outside-toplevel

  return dict(SD15_SCHEDULE, beta_schedule="scaled_linear", clip_sample=False)


def sd_schedule():
  """alignjax's NoiseSchedule of the same scheduler."""
  # pylint: disable=import-outside-toplevel
  from alignjax.diffusion import schedules
  from alignjax.diffusion.full_size import SD15_SCHEDULE

  return schedules.make_schedule("scaled_linear", 1000, **SD15_SCHEDULE)


def in_memory(state_dict):
  """A torch state dict as an `InMemoryCheckpoint` of float32 arrays (for torch_keys.load_state)."""
  from alignjax.models.convert.safetensors_io import InMemoryCheckpoint  # pylint: disable=import-outside-toplevel

  return InMemoryCheckpoint({k: v.detach().float().cpu().numpy() for k, v in state_dict.items()})
