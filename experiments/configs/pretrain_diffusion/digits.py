r"""Pretrain the embedded digits diffusion model (class-conditional UNet) and its classifier.

  python -m experiments.pretrain_diffusion --config=experiments/configs/pretrain_diffusion/digits.py --workdir=runs/pretrain_digits

Expected (2-core CPU, < 5 minutes): classifier test accuracy >= 97% (typically ~99%), and
>= 80% of the 1,000 class-conditional DDIM samples (100 per digit) recognised by the
classifier as the intended digit. Without --workdir the models go to the default cache
($ALIGNJAX_CACHE or ~/.cache/alignjax/digits), where `ensure_pretrained` (used by the DDPO
script) finds them. Results are in <workdir>/report.json; samples in <workdir>/images/.

Argument (`--config=...digits.py:tiny=True`):
  tiny   True: a few-channel UNet and classifier trained for a handful of steps (smoke tests).
"""

import ml_collections

from alignjax import configs, finite


def get_config(arg=None):
  arg = configs.parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # PRNG for init, training and sampling: "rbg" compiles several times faster than
  # "threefry2x32" on CPU (XLA's RngBitGenerator instead of an unrolled hash).
  c.prng_impl = "rbg"

  # The noise schedule the UNet is trained with; alignjax.diffusion.schedules.make_schedule.
  c.schedule = dict(kind="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)

  # alignjax.models.unet.UNetConfig fields (image_size, channels, num_classes fixed by data).
  c.unet = dict(
      channels=(16, 32, 64),
      num_res_blocks=1,
      attention_resolutions=(2,),
      num_heads=4,
      num_groups=8,
      embed_dim=128,
      time_freq_dim=32,
  )
  # Epsilon-prediction training (script eq. 1) with label dropout and an EMA (eq. 2).
  # Stop on the first NaN/inf loss or parameter (alignjax.finite).
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.train = dict(
      steps=1200,
      batch_size=64,
      learning_rate=2e-3,
      warmup_steps=100,
      end_lr_fraction=0.1,
      weight_decay=0.0,
      max_grad_norm=1.0,
      ema_decay=0.999,
      p_uncond=0.1,
      log_every=100,
  )

  # alignjax.models.classifier.ClassifierConfig fields, and its training.
  c.classifier = dict(channels=(32, 64), hidden_dim=128, num_groups=8)
  c.classifier_train = dict(
      steps=500, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, max_shift=1, noise_std=0.05
  )

  # Evaluation: class-conditional DDIM samples with classifier-free guidance.
  # The first guidance scale gives the headline recognition rate; the DDPO digits config
  # samples with the same num_steps / eta / scale.
  c.sample = dict(
      per_class=100,
      num_steps=20,
      eta=1.0,
      guidance_scales=(2.0, 1.0),
      clip_sample=1.0,
      batch_size=500,
  )
  c.targets = dict(classifier_accuracy=0.97, recognition_rate=0.80)

  if arg.tiny:
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
  return c
