r"""Pretrain the embedded digits model as a rectified-flow velocity model (same UNet) + classifier.

  python -m experiments.pretrain_diffusion --config=experiments/configs/pretrain_diffusion/digits_flow.py

Expected: classifier test accuracy >= 97%, and >= 80% of the 1,000 class-conditional
Euler-ODE samples (20 steps, guidance 2; 100 per digit) recognised by the classifier as the
intended digit. Measured: accuracy 98.6%, recognition 100% at guidance 2 and 97.2% at
guidance 1 (the model Adjoint Matching fine-tunes); 6 min 2 s on a 2-core CPU shared with
other jobs (UNet 285 s at ~4.4 steps/s; it ran at ~7.5 steps/s, i.e. ~160 s for the UNet and
under 4 minutes in all, while the cores were free). Without --workdir the models go to the flow cache, the subdirectory
flow/ of the eps cache ($ALIGNJAX_CACHE or ~/.cache/alignjax/digits), where
`ensure_pretrained` finds them; the eps model's cache is left as it is.

The values are those of `alignjax.diffusion.digits_pretraining.default_config("flow")`: the
UNet, classifier, optimiser, EMA and label dropout of digits.py; what differs:
  objective  "flow": the loss is the per-pixel rectified-flow loss
             (alignjax.diffusion.digits_training eq. 5) on X_t = (1 - t) X_0 + t X_1
             (t: noise 0 -> data 1, alignjax.diffusion.flow).
  flow       time_scale: the UNet's timestep input is tau = time_scale * (1 - t) (a float;
             noise at tau = 1000 and data at tau = 0, as for the eps model's integer t).
  sample     sampler "ode" (Euler) or "sde" (memoryless Euler-Maruyama, flow eq. 6);
             no eta / clip_sample, no noise schedule.

Argument (`--config=...digits_flow.py:tiny=True`):
  tiny   True: a few-channel UNet and classifier trained for a handful of steps (smoke tests).
"""

from alignjax import configs
from alignjax.diffusion import digits_pretraining
from experiments.configs.pretrain_diffusion import digits


def get_config(arg=None):
  arg = configs.parse_arg(arg, tiny=False)
  c = digits_pretraining.default_config("flow")
  if arg.tiny:
    digits.make_tiny(c)  # the same smoke-test sizes as the eps model's
  return c
