r"""Pretrain the embedded digits diffusion model (class-conditional UNet) and its classifier.

  python -m experiments.pretrain_diffusion --config=experiments/configs/pretrain_diffusion/digits.py --workdir=runs/pretrain_digits

Expected (2-core CPU, < 5 minutes): classifier test accuracy >= 97% (typically ~99%), and
>= 80% of the 1,000 class-conditional DDIM samples (100 per digit) recognised by the
classifier as the intended digit. Without --workdir the models go to the default cache
($ALIGNJAX_CACHE or ~/.cache/alignjax/digits), where `ensure_pretrained` (used by the DDPO
script) finds them. Results are in <workdir>/report.json; samples in <workdir>/images/.

The values are those of `alignjax.diffusion.digits_pretraining.default_config("eps")` (the
config `ensure_pretrained` uses by default), kept there so that they exist once.

Argument (`--config=...digits.py:tiny=True`):
  tiny   True: a few-channel UNet and classifier trained for a handful of steps (smoke tests).
"""

from alignjax import configs
from alignjax.diffusion import digits_pretraining


def get_config(arg=None):
  arg = configs.parse_arg(arg, tiny=False)
  c = digits_pretraining.default_config("eps")
  if arg.tiny:
    make_tiny(c)
  return c


def make_tiny(c) -> None:
  """Shrinks a pretraining config (eps or flow) in place to the smoke-test size."""
  c.unet.update(
      channels=(8,),
      attention_resolutions=(),
      num_heads=2,
      num_groups=4,
      embed_dim=16,
      time_freq_dim=8,
  )
  c.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=2)
  c.classifier.update(channels=(8, 8), hidden_dim=16, num_groups=4)
  c.classifier_train.update(steps=4, batch_size=16)
  c.sample.update(per_class=2, num_steps=3, guidance_scales=(2.0,), batch_size=20)
