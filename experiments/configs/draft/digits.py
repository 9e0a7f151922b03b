r"""DRaFT on the embedded digits model: backpropagate the classifier reward through the sampler.

  python -m experiments.draft --config=experiments/configs/draft/digits.py --workdir=runs/draft_digits

Fine-tunes the cached pretrained digits UNet (pretrained first when the cache lacks it) so
that its samples for the prompt "digit c" are recognised as c: the reward is the
differentiable log p_classifier(c | image), backpropagated through a deterministic DDIM
chain (eta = 0, as in the DRaFT paper). Expected (2-core CPU, with the model cached; measured
2 min 24 s): the mean reward on 320 held-out seeds rises from -0.30 (base) to about -0.01
while the within-class diversity (mean pairwise L2 distance between images of one digit)
falls from 1.90 to about 1.55 — the price of the reward, and the number to watch for reward
hacking (see the closing table, reward_curve.png and diversity_curve.png).

Variants through the argument (`--config=...digits.py:variant=lv,finetune=lora`):
  variant   full (default): DRaFT, the gradient through every sampling step;
            k: DRaFT-K, the gradient through the last `draft.truncation_k` steps (5);
            1: DRaFT-1 (DRaFT-K with K = 1);
            lv: DRaFT-LV, `draft.lv_samples` re-noised one-step denoisings of the sample (2).
  finetune  full (default) | lora.
  reward    classifier (default) | brightness (the differentiable rewards).
  tiny      True: a randomly initialised tiny UNet and a handful of steps (tests, smoke runs).
"""

import ml_collections

from alignjax import configs, finite
from alignjax.algorithms.draft import VARIANTS


def get_config(arg=None):
  arg = configs.parse_arg(arg, variant="full", finetune="full", reward="classifier", tiny=False)
  if arg.variant not in VARIANTS:
    raise configs.ConfigError(f"variant={arg.variant!r}: valid choices are {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_updates = 40

  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)

  # Base model: "pretrained" loads (pretraining if needed) from cache_dir ("" = the default
  # cache, $ALIGNJAX_CACHE or ~/.cache/alignjax/digits); "random" initialises a UNet of
  # size `random_preset` ("tiny") with `seed` — used by tests.
  c.model = dict(init="random" if arg.tiny else "pretrained", cache_dir="", random_preset="tiny")

  # target -1: each sample's own prompt digit; 0..9: one digit for every prompt.
  c.reward = dict(name=arg.reward, target=-1, jpeg_quality=95, jpeg_upscale=4)

  # The chain that is differentiated (and the evaluation sampler): DDIM, eta = 0.
  c.sampling = ml_collections.ConfigDict(
      dict(num_steps=10, eta=0.0, guidance_scale=1.0, batch_size=32, clip_sample=1.0)
  )

  # remat_policy: per-step gradient checkpointing of the differentiated steps, one of
  # alignjax.algorithms.draft.REMAT_POLICIES ("full": store only each step's input).
  # reward_scale λ_r and kl_weight λ_KL of draft eq. 2 (kl_weight > 0: the eq. 5 penalty
  # toward the frozen base model's noise prediction).
  c.draft = ml_collections.ConfigDict(
      dict(
          variant=arg.variant,
          truncation_k=5,
          lv_samples=2,
          remat_policy="full",
          reward_scale=1.0,
          kl_weight=0.0,
      )
  )

  c.finetune = dict(mode=arg.finetune, lora_rank=8, lora_alpha=8.0)
  c.optimizer = dict(
      learning_rate=5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0
  )
  if arg.finetune == "lora":
    c.optimizer.learning_rate = 1e-3

  # XLA compiler options of the jitted DRaFT step and sampler (jax.jit(compiler_options=)).
  c.compiler_options = {}

  # on_damage: "error" stops on a damaged newest checkpoint; "fallback" resumes from the
  # newest intact one (alignjax.checkpoint). finite: stop (or skip the update) on NaN/inf.
  c.checkpoint = dict(every=10, keep=3, on_damage="error")
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.log = dict(image_every=10, num_images=50)
  c.eval = dict(num_samples=320, seed=10_000)

  if arg.tiny:
    c.num_updates = 2
    c.sampling.update(num_steps=3, batch_size=16, guidance_scale=2.0)
    c.draft.truncation_k = 2
    c.checkpoint.every = 1
    c.log.image_every = 1
    c.log.num_images = 16
    c.eval.num_samples = 32
    # No LLVM optimisation: the tiny step compiles ~2.5x faster on a CPU; it runs in ms anyway.
    c.compiler_options = {"xla_backend_optimization_level": 0}
  return c
