"""Pieces the Stable Diffusion benchmarks share: SD 1.5's DDIM scheduler settings and a torch
state dict as a checkpoint alignjax's key tables read."""

SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def in_memory(state_dict):
  """A torch state dict as an `InMemoryCheckpoint` of float32 arrays (for torch_keys.load_state)."""
  from alignjax.models.convert.safetensors_io import InMemoryCheckpoint  # pylint: disable=import-outside-toplevel

  return InMemoryCheckpoint({k: v.detach().float().cpu().numpy() for k, v in state_dict.items()})
