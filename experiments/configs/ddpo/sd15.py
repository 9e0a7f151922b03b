r"""DDPO on Stable Diffusion 1.5 (Black et al. 2023): aesthetic quality or JPEG (in)compressibility.

  python -m experiments.ddpo --config=experiments/configs/ddpo/sd15.py:reward=aesthetic \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.reward.model_dir=/data/clip-vit-large-patch14 \
      --config.reward.mlp_path=/data/aesthetic_mlp.safetensors --workdir=runs/ddpo_sd15

For users with the real weights (a local diffusers pipeline directory; nothing is downloaded)
on GPUs or TPUs. The paper's settings (its appendix and the reference implementation's
configs): DDIM with 50 steps, eta = 1, guidance 5; per round 256 samples (4 batches of 64) of
the 45 simple-animal prompts (`alignjax/data/prompt_sets/simple_animals.txt`); per-prompt
advantage normalisation (buffer 32, at least 16 rewards), advantages clipped to ±5; the clipped
importance-sampling objective with clip range 1e-4, one inner epoch of 2 optimizer steps
(128 samples × 50 steps each, in microbatches of 32 (sample, step) pairs); LoRA of rank 4 on
the UNet's attention projections at learning rate 3e-4, AdamW (β = 0.9, 0.999, weight decay
1e-4), gradients clipped at norm 1; bfloat16 compute with float32 master weights.

  reward   aesthetic (LAION predictor on CLIP ViT-L/14: reward.model_dir is a transformers
           CLIPModel directory, reward.mlp_path the predictor's weights converted to
           safetensors, see alignjax/rewards/clip_rewards.py) | compressibility |
           incompressibility (JPEG size at quality 95, no model).
  finetune lora (default) | full.
  tiny     True: the same script at a tiny size (tests: a tiny random pipeline directory as
           model.path, 4 steps, 2 rounds of 8 samples, float32).

Memory plan (`python -m benchmarks.sd_memory_plan`: the step compiled, not run, for 8 fake CPU
devices; per-device GB from XLA:CPU's memory analysis, bfloat16 compute, float32 master
weights, UNet remat on; CPU attention materialises its score matrices where cuDNN/TPU flash
attention does not, so the temporaries overstate a GPU's or TPU's):

  mesh data 8 x fsdp 1   arguments  temporaries  peak   16 GB  80 GB
  LoRA                   3.56       75.97        79.53  no     yes
  full fine-tuning       10.43      86.42        96.85  no     no
  full, data 1 x fsdp 8  1.40       81.62        83.02  no     no
"""

import ml_collections

from alignjax import configs, finite

REWARDS = {
    "aesthetic": "aesthetic",
    "compressibility": "jpeg_compressibility",
    "incompressibility": "jpeg_incompressibility",
}


def get_config(arg=None):
  arg = configs.parse_arg(arg, reward="aesthetic", finetune="lora", tiny=False)
  if arg.reward not in REWARDS:
    raise configs.ConfigError(f"reward={arg.reward!r}: valid choices are {tuple(REWARDS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_rounds = 100

  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)

  # A local diffusers pipeline directory; height/width 0: the UNet's sample size (512 px).
  c.model = dict(
      family="stable_diffusion",
      path="",
      variant="",
      compute_dtype="bfloat16",
      remat=True,
      height=0,
      width=0,
      clip_skip=0,
  )
  c.prompts = dict(set="simple_animals", file="", template="{}")
  c.reward = dict(
      name=REWARDS[arg.reward], model_dir="", mlp_path="", jpeg_quality=95, jpeg_upscale=1
  )

  c.sampling = ml_collections.ConfigDict(
      dict(
          num_steps=50,
          eta=1.0,
          guidance_scale=5.0,
          batch_size=64,
          batches_per_round=4,
          clip_sample=ml_collections.FieldReference(None, field_type=float),
      )
  )
  c.ddpo = ml_collections.ConfigDict(
      dict(
          objective="clipped",
          clip_range=1e-4,
          adv_clip_max=5.0,
          inner_epochs=1,
          num_minibatches=2,
          num_microbatches=200,
          timestep_fraction=1.0,
          per_prompt_stat_tracking=True,
          buffer_size=32,
          min_count=16,
          minibatch_loop="scan",
      )
  )
  c.finetune = dict(mode=arg.finetune, lora_rank=4, lora_alpha=4.0)
  c.optimizer = dict(
      learning_rate=3e-4 if arg.finetune == "lora" else 1e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=1e-4,
      max_grad_norm=1.0,
  )
  c.compiler_options = {}
  c.checkpoint = dict(every=10, keep=3, on_damage="error")
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.log = dict(image_every=10, num_images=16, image_scale=1)
  c.eval = dict(num_samples=128, seed=10_000, every=10, curve_samples=64)

  if arg.tiny:
    c.num_rounds = 2
    c.model.update(compute_dtype="float32", remat=False)
    c.sampling.update(num_steps=4, batch_size=8, batches_per_round=1)
    c.ddpo.update(num_minibatches=2, num_microbatches=2, buffer_size=8, min_count=2)
    c.checkpoint.every = 1
    c.log.update(image_every=1, num_images=4)
    c.eval.update(num_samples=8, curve_samples=8, every=0)
    c.compiler_options = {"xla_backend_optimization_level": 0}
  return c
