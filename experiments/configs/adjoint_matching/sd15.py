r"""Adjoint Matching (Domingo-Enrich et al. 2024) on Stable Diffusion 1.5: a CLIP preference or aesthetic reward.

  python -m experiments.adjoint_matching --config=experiments/configs/adjoint_matching/sd15.py:reward=preference \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.reward.model_dir=/data/PickScore_v1 --workdir=runs/am_sd15

For users with the real weights (a local diffusers pipeline directory; nothing is downloaded)
on GPUs or TPUs. No result has been measured with this config yet. SD 1.5 is an
eps-prediction model, so the script runs the DDPM-chain form of Adjoint Matching
(alignjax/algorithms/adjoint_matching_ddpm.py, `model.kind=eps`; eta = 1 is the memoryless
chain the paper requires); the reward differentiates through the VAE decoder.

Settings. The paper fine-tunes a flow-matching text-to-image model, not SD 1.5, with
ImageReward; its exact numbers do not carry over, and every value below is alignjax's
choice: λ = 100 (the reward multiplier: the tilt p_base exp(λ r); CLIP preference and
aesthetic scores differ between images by O(0.1-1)); 40 DDPM steps (eta = 1, guidance 5 in
both the fine-tuned and the base chain) with the loss on 10 of them drawn per trajectory
(timestep subsampling, algorithm eq. 8); 16 samples per step; LoRA of rank 4 on the UNet's
attention projections at learning rate 1e-4 (full fine-tuning 1e-5), AdamW without weight
decay, gradients clipped at norm 1; bfloat16 compute with float32 master weights and each
UNet block rematerialised in the backward pass.

  reward   preference (default; config.reward.name "clip_preference", PickScore/HPS-style:
           reward.model_dir a transformers CLIPModel directory with its tokenizer) |
           aesthetic (LAION predictor on CLIP ViT-L/14: reward.model_dir a CLIPModel
           directory, reward.mlp_path the predictor's weights as safetensors,
           see alignjax/rewards/clip_rewards.py).
  finetune lora (default) | full.
  tiny     True: the same script at a tiny size (tests: a tiny random pipeline directory as
           model.path, 4 steps, 2 iterations of 8 samples, float32).

Memory plan (`python -m benchmarks.sd_memory_plan`: the step compiled, not run, for 8 fake CPU
devices; per-device GB from XLA:CPU's memory analysis, bfloat16 compute, float32 master
weights, UNet remat on; CPU attention materialises its score matrices where cuDNN/TPU flash
attention does not, so the temporaries overstate a GPU's or TPU's):

  mesh                   arguments  temporaries  peak    16 GB  80 GB  compile
  data 8 x fsdp 1, LoRA  4.87       42.13        46.99   no     yes    199 s
  data 8 x fsdp 1, full  15.17      52.19        67.36   no     yes    193 s
  data 1 x fsdp 8, LoRA  0.61       39.18        39.79   no     yes    312 s
  data 1 x fsdp 8, full  1.90       49.89        51.79   no     yes    408 s

(`--algorithms=am --remat=true`.) The gradient is accumulated over am.num_microbatches = 10
chunks of the 16 x 10 (sample, step) pairs (algorithm eq. 9), so the UNet's backward pass sees
2 pairs x 2 guidance branches per device at once; differentiating all 10 timesteps of every
sample in one batch (num_microbatches = 1) planned 380.90 (LoRA) to 434.50 GB per device.
"""

import ml_collections

from alignjax import configs, finite

REWARDS = {"preference": "clip_preference", "aesthetic": "aesthetic"}


def get_config(arg=None):
  arg = configs.parse_arg(arg, reward="preference", finetune="lora", tiny=False)
  if arg.reward not in REWARDS:
    raise configs.ConfigError(f"reward={arg.reward!r}: valid choices are {tuple(REWARDS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_iterations = 400

  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)

  # A local diffusers pipeline directory; height/width 0: the UNet's sample size (512 px).
  c.model = dict(
      family="stable_diffusion",
      kind="eps",
      path="",
      variant="",
      compute_dtype="bfloat16",
      remat=True,
      height=0,
      width=0,
      clip_skip=0,
  )
  c.prompts = dict(set="imagenet_animals", file="", template="{}")
  c.reward = dict(name=REWARDS[arg.reward], model_dir="", mlp_path="", clip_at_zero=True)

  # The memoryless DDPM chain (eta = 1) for training and evaluation; clip_sample 0: no x̂_0
  # clipping (SD 1.5's scheduler does not clip).
  c.sampling = ml_collections.ConfigDict(
      dict(num_steps=40, eta=1.0, clip_sample=0.0, guidance_scale=5.0, batch_size=16)
  )
  c.am = ml_collections.ConfigDict(dict(lam=100.0, num_timesteps=10, loss_clip=float("inf")))
  # Gradient accumulation over chunks of the 16 x 10 (sample, step) pairs (algorithm eq. 9):
  # 10 chunks of 16 pairs, 2 per device on 8 devices, in the UNet's backward pass at once.
  c.am.num_microbatches = 10

  c.finetune = dict(mode=arg.finetune, lora_rank=4, lora_alpha=4.0)
  c.optimizer = dict(
      learning_rate=1e-4 if arg.finetune == "lora" else 1e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      max_grad_norm=1.0,
  )
  c.compiler_options = {}
  c.checkpoint = dict(every=20, keep=3, on_damage="error")
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.log = dict(image_every=20, num_images=16)
  c.eval = dict(num_samples=64, seed=10_000)

  if arg.tiny:
    c.num_iterations = 2
    c.model.update(compute_dtype="float32", remat=False)
    c.sampling.update(num_steps=4, batch_size=8)
    c.am.update(num_timesteps=2, num_microbatches=2)  # 8 x 2 pairs in 2 chunks
    c.checkpoint.every = 1
    c.log.update(image_every=1, num_images=4)
    c.eval.num_samples = 8
    c.compiler_options = {"xla_backend_optimization_level": 0}
  return c
