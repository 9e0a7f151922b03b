r"""DRaFT on Stable Diffusion 1.5 (Clark et al. 2023): backpropagate the aesthetic reward.

  python -m experiments.draft --config=experiments/configs/draft/sd15.py:variant=lv \
      --config.model.path=/data/stable-diffusion-v1-5 \
      --config.reward.model_dir=/data/clip-vit-large-patch14 \
      --config.reward.mlp_path=/data/aesthetic_mlp.safetensors --workdir=runs/draft_sd15

For users with the real weights (a local diffusers pipeline directory; nothing is downloaded)
on GPUs or TPUs. No expected result is recorded yet: this config has not been run at full
size in this repository.

Taken from the paper (Clark, Vicol, Swersky & Fleet 2023, "Directly Fine-Tuning Diffusion
Models on Differentiable Rewards", which fine-tunes SD 1.4): DDIM sampling with 50 steps and
eta = 0 (a deterministic, differentiable chain), classifier-free guidance 7.5, LoRA on the
UNet's attention projections, the LAION aesthetic predictor on CLIP ViT-L/14 as the reward,
DRaFT-LV with n = 2 re-noised copies of the last step (alignjax/algorithms/draft.py eq. 4),
DRaFT-K with K = 10 as the truncated variant, and gradient checkpointing of the
differentiated steps. Taken from the paper as recalled, not re-checked against its appendix:
LoRA rank 8, AdamW at learning rate 4e-4. Our choices: the 45 simple-animal prompts of DDPO
(`alignjax/data/prompt_sets/simple_animals.txt`, as experiments/configs/ddpo/sd15.py), batch
16, 400 updates, gradients clipped at norm 1, no KL penalty (draft.kl_weight = 0), bfloat16
compute with float32 master weights, each differentiated step rematerialised
(draft.remat_policy = "full") and each UNet block within it (model.remat).

  variant  lv (default): DRaFT-LV, K = 1 with draft.lv_samples = 2;
           1: DRaFT-1 (DRaFT-K with K = 1);
           k10: DRaFT-K with K = 10 (draft.truncation_k).
  finetune lora (default) | full.
  tiny     True: the same script at a tiny size (tests: a tiny random pipeline directory as
           model.path and a tiny CLIP model as reward.model_dir; 4 steps, K = 2 for k10, 2
           updates of 8 samples, float32).

Memory plan (`python -m benchmarks.sd_memory_plan`: the step compiled, not run, for 8 fake CPU
devices; per-device GB from XLA:CPU's memory analysis, bfloat16 compute, float32 master
weights, UNet remat on; CPU attention materialises its score matrices where cuDNN/TPU flash
attention does not, so the temporaries overstate a GPU's or TPU's):

  mesh data 8 x fsdp 1, DRaFT-K = 10   arguments  temporaries  peak   16 GB  80 GB
  LoRA                                 4.88       42.33        47.20  no     yes
  full fine-tuning                     11.73      48.70        60.43  no     yes
  full, data 1 x fsdp 8                1.47       47.70        49.17  no     yes
  LoRA, UNet remat off                 4.88       38.38        43.25  no     yes

(XLA:CPU plans slightly less without the UNet's block remat here: the per-step remat of
draft.remat_policy already bounds what is kept; compare on the target accelerator.)
"""

import ml_collections

from alignjax import configs, finite

# argument → (draft.variant, draft.truncation_k)
VARIANTS = {"lv": ("lv", 1), "1": ("1", 1), "k10": ("k", 10)}


def get_config(arg=None):
  arg = configs.parse_arg(arg, variant="lv", finetune="lora", tiny=False)
  if arg.variant not in VARIANTS:
    raise configs.ConfigError(f"variant={arg.variant!r}: valid choices are {tuple(VARIANTS)}")
  variant, truncation_k = VARIANTS[arg.variant]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_updates = 400

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
  # aesthetic: reward.model_dir a transformers CLIPModel directory (ViT-L/14), reward.mlp_path
  # the LAION predictor's weights as safetensors (alignjax/rewards/clip_rewards.py).
  c.reward = dict(name="aesthetic", model_dir="", mlp_path="", jpeg_quality=95, jpeg_upscale=1)

  # The chain that is differentiated (and the evaluation sampler): DDIM, eta = 0.
  c.sampling = ml_collections.ConfigDict(
      dict(
          num_steps=50,
          eta=0.0,
          guidance_scale=7.5,
          batch_size=16,
          clip_sample=ml_collections.FieldReference(None, field_type=float),
      )
  )
  # remat_policy: per-step checkpointing of the differentiated steps (draft.REMAT_POLICIES).
  c.draft = ml_collections.ConfigDict(
      dict(
          variant=variant,
          truncation_k=truncation_k,
          lv_samples=2,
          remat_policy="full",
          reward_scale=1.0,
          kl_weight=0.0,
      )
  )
  c.finetune = dict(mode=arg.finetune, lora_rank=8, lora_alpha=8.0)
  c.optimizer = dict(
      learning_rate=4e-4 if arg.finetune == "lora" else 1e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      max_grad_norm=1.0,
  )
  c.compiler_options = {}
  c.checkpoint = dict(every=50, keep=3, on_damage="error")
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.log = dict(image_every=50, num_images=16, image_scale=1)
  c.eval = dict(num_samples=128, seed=10_000)

  if arg.tiny:
    c.num_updates = 2
    c.model.compute_dtype = "float32"
    c.sampling.update(num_steps=4, batch_size=8)
    c.draft.truncation_k = min(truncation_k, 2)
    c.checkpoint.every = 1
    c.log.update(image_every=1, num_images=4)
    c.eval.num_samples = 8
    c.compiler_options = {"xla_backend_optimization_level": 0}
  return c
