r"""One DDPO inner epoch with its minibatch steps unrolled vs in a `lax.scan`, same run.

  python -m benchmarks.ddpo_epoch                      # the digits UNet, 128 samples x 10 steps
  python -m benchmarks.ddpo_epoch --samples=256 --minibatches=4

The model is the digits UNet of experiments/configs/pretrain_diffusion/digits.py (733k
parameters, random weights: speed does not depend on them). One epoch trains on
samples x (timestep_fraction x steps) (x_t, x_{t-1}) pairs in `minibatches` optimizer steps
(DDPO-IS, full fine-tuning, Adam), as `alignjax.algorithms.ddpo.make_epoch_fn` builds it with
minibatch_loop="unrolled" (the default) and "scan". Both programs get the same trajectory and
advantages and end in the same parameters (checked); the table gives the best of `--repeats`
calls after one untimed compiling call, and the ratio scan / unrolled.

Measured on the 2-core development CPU (AMD EPYC, shared; 128 samples, 10 steps, 2
minibatches of 320 pairs): scan 15-17 s, unrolled 1.7-2.0 s per epoch, ratio ~9. XLA:CPU runs
the UNet's gradient (its convolutions' backward passes) far slower inside a while loop than
in straight-line code; forward passes in a loop (the sampler) do not suffer.
"""

from __future__ import annotations

import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignjax import testing
from alignjax.algorithms import ddpo
from alignjax.diffusion import digits_pretraining, digits_training, samplers, schedules
from alignjax.models import unet as unet_lib
from alignjax.training import TrainState

_SAMPLES = flags.DEFINE_integer("samples", 128, "Trajectories per epoch.")
_STEPS = flags.DEFINE_integer("steps", 10, "Denoising steps per trajectory.")
_MINIBATCHES = flags.DEFINE_integer("minibatches", 2, "Optimizer steps per epoch.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per variant (best kept).")


def build(samples: int, steps: int):
  """(graphdef, params, schedule, trajectory, advantages) of the digits UNet."""
  config = digits_training.unet_config(digits_pretraining.default_config())
  unet = testing.host_init(lambda rngs: unet_lib.UNet(config, rngs=rngs), 0)
  graphdef, params = nnx.split(unet)
  schedule = schedules.make_schedule("linear")
  cond = jnp.arange(samples, dtype=jnp.int32) % config.num_classes
  model_eps = lambda p: (lambda x, t, c: nnx.merge(graphdef, p)(x, t, c))
  traj = jax.jit(
      lambda p, key: samplers.sample(
          model_eps(p),
          schedule,
          cond,
          key,
          shape=(config.image_size, config.image_size, config.in_channels),
          num_steps=steps,
          eta=1.0,
          clip_sample=1.0,
      )
  )(params, jax.random.key(1))
  advantages = jax.random.normal(jax.random.key(2), (samples,))
  return graphdef, params, schedule, traj, advantages, model_eps


def time_epoch(
    loop: str, params, schedule, traj, advantages, model_eps, minibatches: int, repeats: int
):
  """(best seconds per epoch, final parameters) of one minibatch_loop variant."""
  optimizer = optax.adam(1e-5)
  epoch = jax.jit(
      ddpo.make_epoch_fn(
          lambda trainable, frozen: model_eps(trainable),
          schedule,
          optimizer,
          objective="clipped",
          clip_range=1e-2,
          eta=1.0,
          guidance_scale=1.0,
          null_cond=10,
          timestep_fraction=0.5,
          num_minibatches=minibatches,
          clip_sample=1.0,
          minibatch_loop=loop,
      )
  )
  fresh = lambda: TrainState.create(
      jax.tree_util.tree_map(jnp.copy, params), optimizer, jax.random.key(3)
  )
  final = jax.block_until_ready(epoch(fresh(), {}, traj, advantages)[0].params)  # compiles
  best = np.inf
  for _ in range(repeats):
    state = fresh()
    t0 = time.perf_counter()
    jax.block_until_ready(epoch(state, {}, traj, advantages))
    best = min(best, time.perf_counter() - t0)
  return best, final


def main(argv):
  del argv
  if _SAMPLES.value % _MINIBATCHES.value:
    raise app.UsageError(
        f"--samples={_SAMPLES.value} must divide into " f"--minibatches={_MINIBATCHES.value}"
    )
  _, params, schedule, traj, advantages, model_eps = build(_SAMPLES.value, _STEPS.value)
  results = {
      loop: time_epoch(
          loop, params, schedule, traj, advantages, model_eps, _MINIBATCHES.value, _REPEATS.value
      )
      for loop in ddpo.MINIBATCH_LOOPS
  }
  diff = max(
      float(jnp.max(jnp.abs(a - b)))
      for a, b in zip(
          jax.tree_util.tree_leaves(results["unrolled"][1]),
          jax.tree_util.tree_leaves(results["scan"][1]),
      )
  )
  pairs = _SAMPLES.value * ddpo.num_train_steps(_STEPS.value, 0.5, schedule=schedule, eta=1.0)
  print(
      f"DDPO epoch, digits UNet, {_SAMPLES.value} samples x {_STEPS.value} steps, "
      f"{pairs} pairs in {_MINIBATCHES.value} minibatches, {jax.devices()[0].device_kind}"
  )
  print("| minibatch_loop | seconds / epoch |\n|---|---|")
  for loop, (seconds, _) in results.items():
    print(f"| {loop} | {seconds:.3f} |")
  print(
      f"ratio scan / unrolled: {results['scan'][0] / results['unrolled'][0]:.2f}; "
      f"max |Δθ| between the two: {diff:.2e}"
  )


if __name__ == "__main__":
  app.run(main)
