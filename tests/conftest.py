"""Test-session setup: 8 fake CPU devices, float32 matmuls at full precision; builders of
tiny random Stable Diffusion and CLIP checkpoints (fixtures tiny_sd_pipeline, tiny_sd_dir,
tiny_clip_dir)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------- test order


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run first (otherwise in collection order). Under `-n 2 --dist
  worksteal` the first worker starts on them while the second runs short tests and then steals
  from the end of the first's queue, so the run ends on short tests instead of one worker
  running a long test alone while the other idles."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# ----------------------------------------------------------------------------- compilation cache
# One persistent XLA compilation cache for the whole run, shared by the xdist workers (under
# pytest's base temporary directory, which pytest prunes): tests build many identical
# programs (the same tiny models in different files and parametrisations), and a program
# that took over COMPILE_CACHE_MIN_SECONDS to compile is then loaded, not compiled again. A
# cache hit loads the same executable, so results are unchanged.

COMPILE_CACHE_MIN_SECONDS = 0.5


@pytest.fixture(autouse=True, scope="session")
def _shared_compilation_cache(tmp_path_factory):
  from jax.experimental.compilation_cache import compilation_cache

  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  directory = str(root / "xla-compilation-cache")
  os.makedirs(directory, exist_ok=True)
  os.environ["ALIGNJAX_TEST_XLA_CACHE"] = directory
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
  yield directory


# ----------------------------------------------------------------------------- tiny Stable Diffusion
# Builders of tiny random diffusers/transformers checkpoints written to disk (no downloads),
# shared by the pipeline, reward and experiment tests. torch, diffusers and transformers are
# imported when a builder runs, not when the test session starts.

SD_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>"]
SD_VOCAB += ["t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>"]
SD_VOCAB += ["<|startoftext|>", "<|endoftext|>"]
SD_MAX_LENGTH = 12


def write_clip_tokenizer(directory):
  """A CLIP BPE tokenizer (vocab.json, merges.txt) over SD_VOCAB, written to `directory`."""
  import transformers

  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(SD_VOCAB)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
  return transformers.CLIPTokenizer(
      os.path.join(directory, "vocab.json"),
      os.path.join(directory, "merges.txt"),
      model_max_length=SD_MAX_LENGTH,
  )


def randomize_torch(module, seed, std=0.08):
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return module.eval()


def _tiny_clip_text_config():
  import transformers

  return transformers.CLIPTextConfig(
      vocab_size=len(SD_VOCAB),
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=SD_MAX_LENGTH,
      bos_token_id=SD_VOCAB.index("<|startoftext|>"),
      eos_token_id=SD_VOCAB.index("<|endoftext|>"),
      pad_token_id=SD_VOCAB.index("<|endoftext|>"),
  )


def build_tiny_sd_pipeline(directory, *, prediction_type="epsilon"):
  """A tiny random StableDiffusionPipeline (UNet 16/32 channels on 8 × 8 latents, a 2-block
  VAE, a 2-layer CLIP text encoder) saved to `directory`; returns the diffusers pipeline."""
  import shutil

  import diffusers
  import torch
  import transformers

  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=8,
      in_channels=4,
      out_channels=4,
      block_out_channels=(16, 32),
      layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32,
      attention_head_dim=4,
      norm_num_groups=8,
  )
  vae = diffusers.AutoencoderKL(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
      up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
      block_out_channels=(16, 32),
      latent_channels=4,
      norm_num_groups=8,
      sample_size=16,
  )
  text_encoder = transformers.CLIPTextModel(_tiny_clip_text_config())
  for i, m in enumerate((unet, vae, text_encoder)):
    randomize_torch(m, i)
  scheduler = diffusers.DDIMScheduler(
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      clip_sample=False,
      set_alpha_to_one=False,
      steps_offset=1,
      prediction_type=prediction_type,
  )
  pipe = diffusers.StableDiffusionPipeline(
      unet=unet,
      vae=vae,
      text_encoder=text_encoder,
      tokenizer=write_clip_tokenizer(os.path.join(directory, "_tok")),
      scheduler=scheduler,
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
  )
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(directory, safe_serialization=True)
  shutil.rmtree(os.path.join(directory, "_tok"))
  return pipe


def build_tiny_clip_model(directory, *, projection_dim=16, seed=5):
  """A tiny random transformers CLIPModel (text as the tiny pipeline's, 32 px vision) and its
  tokenizer saved to `directory`, with an aesthetic MLP of the published layout
  (layers.{0,2,4,6,7}) at `directory`/aesthetic_mlp.safetensors; returns the directory."""
  import torch
  import transformers
  from safetensors.torch import save_file

  vision = transformers.CLIPVisionConfig(
      image_size=32,
      patch_size=8,
      hidden_size=24,
      intermediate_size=48,
      num_hidden_layers=1,
      num_attention_heads=4,
  )
  config = transformers.CLIPConfig(
      text_config=_tiny_clip_text_config().to_dict(),
      vision_config=vision.to_dict(),
      projection_dim=projection_dim,
  )
  randomize_torch(transformers.CLIPModel(config), seed, std=0.1).save_pretrained(directory)
  write_clip_tokenizer(directory).save_pretrained(directory)
  widths = [projection_dim, 1024, 128, 64, 16, 1]
  gen = torch.Generator().manual_seed(seed + 1)
  mlp = {}
  for index, (n_in, n_out) in zip(("0", "2", "4", "6", "7"), zip(widths[:-1], widths[1:])):
    mlp[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    mlp[f"layers.{index}.bias"] = torch.zeros(n_out)
  save_file(mlp, os.path.join(directory, "aesthetic_mlp.safetensors"))
  return directory


@pytest.fixture(scope="session")
def tiny_sd_pipeline():
  """`build_tiny_sd_pipeline(directory, prediction_type=...)`."""
  return build_tiny_sd_pipeline


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
  """A tiny random epsilon-prediction Stable Diffusion pipeline directory (session-wide)."""
  directory = str(tmp_path_factory.mktemp("tiny_sd"))
  build_tiny_sd_pipeline(directory)
  return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
  """A tiny random CLIPModel directory with tokenizer and aesthetic_mlp.safetensors."""
  return build_tiny_clip_model(str(tmp_path_factory.mktemp("tiny_clip")))
