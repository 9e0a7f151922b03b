"""Stable Diffusion VAE: parity with diffusers' AutoencoderKL (encode mean / logvar, decode) on
tiny random models, checkpoint round trips, the full-size key table on the meta device, strict
configs and refusals."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignjax.models.convert import torch_keys
from alignjax.models.convert.safetensors_io import CheckpointError
from alignjax.models.convert.vae_keys import load_vae, save_vae, vae_key_table
from alignjax.models.sd import presets
from alignjax.models.sd.vae import AutoencoderKL, VAEConfig

ATOL = RTOL = 1e-4
TINY = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
    scaling_factor=0.5,
)
CASES = {
    "attn": TINY,
    "plain": dict(TINY, mid_block_add_attention=False, use_quant_conv=False, layers_per_block=2),
}
# stabilityai/sd-vae-ft-mse (the SD 1.x / 2.x VAE) vae/config.json
SD_VAE = dict(presets.SD15_VAE)


def randomize(model, seed=0, std=0.1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * std)
  return model.eval()


def torch_vae(model, x):
  with torch.no_grad():
    post = model.encode(torch.tensor(x)).latent_dist
    dec = model.decode(post.mean).sample
  return post.mean.numpy(), post.logvar.numpy(), dec.numpy()


@nnx.jit
def ours_vae(model, x):
  mean, logvar = model.encode(x)
  return mean, logvar, model.decode(mean)


def ours_nchw(model, x):
  out = ours_vae(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
  return tuple(np.asarray(a).transpose(0, 3, 1, 2) for a in out)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
  theirs = randomize(TorchVAE(**CASES[request.param]), seed=len(request.param))
  d = str(tmp_path_factory.mktemp(request.param))
  theirs.save_pretrained(d, safe_serialization=True)
  ours, config = load_vae(d)
  x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
  return dict(theirs=theirs, ours=ours, config=config, dir=d, x=x, ref=torch_vae(theirs, x))


def test_parity(case):
  mean, logvar, dec = ours_nchw(case["ours"], case["x"])
  ref_mean, ref_logvar, ref_dec = case["ref"]
  assert mean.shape == (2, 4, 8, 8) and dec.shape == (2, 3, 16, 16)
  np.testing.assert_allclose(mean, ref_mean, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(logvar, ref_logvar, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(dec, ref_dec, atol=ATOL, rtol=RTOL)
  assert np.abs(ref_dec).max() > 0.05 and np.abs(ref_mean[0] - ref_mean[1]).max() > 1e-2
  assert case["ours"].scaling_factor == 0.5 == case["config"].scaling_factor


def test_logvar_is_clipped_and_sampled_as_diffusers(case):
  if not case["config"].use_quant_conv:
    pytest.skip("sets quant_conv")
  model = nnx.clone(case["ours"])  # same graph and input shapes: ours_vae's compilation
  model.quant_conv.bias[...] = jnp.array([0.0] * 4 + [-100.0, 100.0, 0.0, 0.0])
  model.quant_conv.kernel[...] = jnp.zeros_like(model.quant_conv.kernel[...])
  mean, logvar, _ = ours_nchw(model, case["x"])
  assert logvar[:, 0].max() == -30.0 and logvar[:, 1].min() == 20.0 and not logvar[:, 2:].any()
  z = np.asarray(
      AutoencoderKL.sample(jax.random.key(0), jnp.full(4096, 3.0), jnp.full(4096, 2 * np.log(2)))
  )
  assert abs(z.mean() - 3.0) < 0.1 and abs(z.std() - 2.0) < 0.1  # N(mean, exp(logvar))


def test_config_round_trip(case):
  config = case["config"]
  assert VAEConfig.from_diffusers(config.to_diffusers()) == config
  assert VAEConfig.from_diffusers(dict(case["theirs"].config)) == config


def test_save_loads_in_diffusers(case, tmp_path):
  written = save_vae(str(tmp_path), case["ours"], max_shard_bytes=50_000)
  assert "diffusion_pytorch_model.safetensors.index.json" in written
  back = TorchVAE.from_pretrained(str(tmp_path)).eval()
  for a, b in zip(torch_vae(back, case["x"]), case["ref"]):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_variant(tmp_path):
  theirs = randomize(TorchVAE(**TINY), seed=5)
  d = str(tmp_path / "fp16")
  theirs.to(torch.float16).save_pretrained(d, safe_serialization=True, variant="fp16")
  assert os.path.exists(os.path.join(d, "diffusion_pytorch_model.fp16.safetensors"))
  ours, _ = load_vae(d, variant="fp16")
  x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
  for a, b in zip(ours_nchw(ours, x), torch_vae(theirs.float(), x)):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)


def test_unsupported_config_fields_are_named():
  with pytest.raises(ValueError, match="shift_factor=0.1.*only shift_factor=None"):
    VAEConfig.from_diffusers({**SD_VAE, "shift_factor": 0.1})
  with pytest.raises(ValueError, match="latents_mean"):
    VAEConfig.from_diffusers({**SD_VAE, "latents_mean": [0.0] * 4})
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
    VAEConfig.from_diffusers({**SD_VAE, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
  with pytest.raises(ValueError, match=r"field\(s\) \['norm_type'\]"):
    VAEConfig.from_diffusers({**SD_VAE, "norm_type": "spatial"})
  with pytest.raises(ValueError, match="_class_name='AutoencoderTiny'"):
    VAEConfig.from_diffusers({**SD_VAE, "_class_name": "AutoencoderTiny"})
  relaxed = {**SD_VAE, "force_upcast": False, "shift_factor": None, "latents_std": None}
  assert VAEConfig.from_diffusers(relaxed).force_upcast is False


def test_bad_checkpoints_are_named(tmp_path):
  config = VAEConfig.from_diffusers(TINY)
  src = str(tmp_path / "src")
  save_vae(src, AutoencoderKL(config, rngs=nnx.Rngs(0)))
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  cfg = open(os.path.join(src, "config.json")).read()

  def write(name, ts, text=cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(text)
    save_file(ts, str(d / "diffusion_pytorch_model.safetensors"))
    return str(d)

  gone = "decoder.mid_block.attentions.0.to_q.weight"
  with pytest.raises(CheckpointError, match=f"lacks 1 tensor.*{gone}"):
    load_vae(write("missing", {k: v for k, v in tensors.items() if k != gone}))
  bad = dict(tensors, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
  with pytest.raises(CheckpointError, match=r"'quant_conv.weight' has shape \(8, 8, 3, 3\)"):
    load_vae(write("shape", bad))
  with pytest.raises(CheckpointError, match="shift_factor"):
    load_vae(write("config", tensors, json.dumps({**json.loads(cfg), "shift_factor": 0.5})))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="empty.*no config.json"):
    load_vae(str(tmp_path / "empty"))


def test_full_size_key_table_matches_diffusers():
  config = VAEConfig.from_diffusers(SD_VAE)
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  shapes = torch_keys.param_shapes(nnx.state(abstract, nnx.Param))
  count = sum(int(np.prod(s.shape)) for s in shapes.values())
  with torch.device("meta"):
    theirs = TorchVAE.from_config(SD_VAE)
  assert count == sum(p.numel() for p in theirs.parameters()) == 83_653_863
  table = vae_key_table(config)
  ours = {k.torch: torch_keys.torch_shape(k.layout, shapes[k.ours].shape) for k in table}
  assert ours == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
