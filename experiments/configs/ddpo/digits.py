r"""DDPO on the embedded digits model: brighter digits (the README's demo, `make demo`).

  python -m experiments.ddpo --config=experiments/configs/ddpo/digits.py --workdir=runs/demo

It pretrains and caches the base UNet and the digits classifier first when the cache lacks
them (measured 4 min 40 s on the 2-core CPU), then fine-tunes the UNet on the brightness
reward (alignjax.rewards.brightness: the mean pixel value in [0, 1]) for 30 rounds of 128
samples at learning rate 3e-4, on a 10-step DDPM chain (DDIM, eta = 1) without guidance boost
(scale 1). Measured (2-core CPU, cache present): 3 min 01 s wall (59 s for the first round,
which compiles, then ~2 s per round); the mean reward on 512 held-out seeds rises from the
base model's 0.310 to 0.491 (training on the 9 stochastic steps only, DDPO rule 7; 0.484
when the final deterministic step was also trained), and, measured before that change, on
the curve's 128 seeds (reward_curve.png, every 5 rounds) 0.312, 0.337, 0.359, 0.383, 0.411,
0.447, 0.485, with the within-class diversity (alignjax.metrics eq. 2) from 1.60 to 1.70. In images/eval_base_000000.png vs eval_final_000030.png (the
same seeds, column c = digit c) the strokes grow thick and bright and the black background
turns grey and speckled; some digits (2, 3, 8) swell into blobs: the reward counts bright
pixels, not legibility.

reward=classifier is prompt alignment: log p_classifier(c | image) for the prompt "digit c",
36 rounds at learning rate 1.5e-4 (measured 4 min 19 s while another job shared the CPU: 97 s
for the first round, then 3.4 s per round): the held-out reward rises from -0.147 to -0.096,
a third of the way to the ceiling 0, while the diversity goes from 1.60 to 1.50. The base
model already draws the intended digit almost always, so the grids barely change; the
reward's spread comes from the rare misdrawn one, so the policy gradient is noisy and DDPO
needs thousands of samples for this gain (reward backpropagation needs far fewer:
experiments/tables/reward_vs_queries.py).

Variants through the argument (`--config=...digits.py:variant=sf,finetune=lora`):
  variant   is (default): DDPO-IS, clipped importance sampling over several minibatches;
            sf: DDPO-SF, one plain policy-gradient step per round.
  finetune  full (default) | lora.
  reward    brightness (default; classifier with tiny=True) | classifier | jpeg_compressibility
            | jpeg_incompressibility. brightness runs 30 rounds at lr 3e-4, the others 36 at 1.5e-4.
  tiny      True: a randomly initialised tiny UNet and a handful of rounds (tests, smoke runs).
"""

import ml_collections

from alignjax import configs, finite


def get_config(arg=None):
  arg = configs.parse_arg(arg, variant="is", finetune="full", reward="", tiny=False)
  reward = arg.reward or ("classifier" if arg.tiny else "brightness")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # brightness: the demo's schedule (see the docstring); the others: the classifier's.
  c.num_rounds = 30 if reward == "brightness" else 36

  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)

  # Base model: "pretrained" loads (pretraining if needed) from cache_dir ("" = the default
  # cache, $ALIGNJAX_CACHE or ~/.cache/alignjax/digits); "random" initialises a UNet of
  # size `random_preset` ("tiny") with `seed` — used by tests.
  c.model = dict(init="random" if arg.tiny else "pretrained", cache_dir="", random_preset="tiny")

  c.reward = dict(name=reward, target=-1, jpeg_quality=95, jpeg_upscale=4)

  c.sampling = ml_collections.ConfigDict(
      dict(
          num_steps=10,
          eta=1.0,
          guidance_scale=1.0,
          batch_size=32,
          batches_per_round=4,
          clip_sample=1.0,
      )
  )

  c.ddpo = ml_collections.ConfigDict(
      dict(
          objective="clipped",
          clip_range=1e-2,
          adv_clip_max=5.0,
          inner_epochs=1,
          num_minibatches=2,
          num_microbatches=1,
          timestep_fraction=0.5,
          per_prompt_stat_tracking=True,
          buffer_size=64,
          min_count=16,
          # alignjax.algorithms.ddpo.make_epoch_fn: "unrolled" minibatch steps run fastest on
          # XLA:CPU; "scan" compiles a program that does not grow with num_minibatches.
          minibatch_loop="unrolled",
      )
  )
  if arg.variant == "sf":
    c.ddpo.objective = "score_function"
    c.ddpo.num_minibatches = 1
    c.ddpo.inner_epochs = 1
  elif arg.variant != "is":
    raise configs.ConfigError(f"variant={arg.variant!r}: valid choices are ('is', 'sf')")

  c.finetune = dict(mode=arg.finetune, lora_rank=8, lora_alpha=8.0)
  c.optimizer = dict(
      learning_rate=3e-4 if reward == "brightness" else 1.5e-4,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      max_grad_norm=1.0,
  )

  # XLA compiler options of the jitted sampler and training step (jax.jit(compiler_options=)).
  c.compiler_options = {}

  # on_damage: "error" stops on a damaged newest checkpoint; "fallback" resumes from the
  # newest intact one (alignjax.checkpoint). finite: stop (or skip the update) on NaN/inf.
  c.checkpoint = dict(every=10, keep=3, on_damage="error")
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  # image_scale: grids enlarged by pixel repetition (the digits are 8 × 8 pixels).
  c.log = dict(image_every=10, num_images=50, image_scale=8)
  # Held-out evaluation on num_samples fixed seeds before and after training; every `every`
  # rounds (0: never) on the first curve_samples of them, for reward_curve.png.
  c.eval = dict(num_samples=512, seed=10_000, every=5, curve_samples=128)

  if arg.tiny:
    c.num_rounds = 2
    c.sampling.update(num_steps=4, batch_size=8, batches_per_round=2, guidance_scale=2.0)
    # The tiny UNet's steps take milliseconds: compile time dominates, so loop, not unroll.
    c.ddpo.update(num_minibatches=2, buffer_size=16, min_count=4, minibatch_loop="scan")
    c.checkpoint.every = 1
    c.log.image_every = 1
    c.eval.update(num_samples=16, curve_samples=8, every=0)
    # No LLVM optimisation: the tiny steps compile several times faster and run in ms anyway.
    c.compiler_options = {"xla_backend_optimization_level": 0}
  return c
