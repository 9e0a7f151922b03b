"""Stable Diffusion UNet: parity with diffusers' UNet2DConditionModel on tiny random models,
checkpoint round trips (variants, shards), key tables against full-size models on the meta
device, strict configs and refusals."""

import json
import os

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignjax.models.convert import torch_keys
from alignjax.models.convert.safetensors_io import CheckpointError
from alignjax.models.convert.unet_keys import load_unet, save_unet, unet_key_table
from alignjax.models.sd.layers import timestep_embedding
from alignjax.models.sd import presets
from alignjax.models.sd.unet import UNet2DConditionModel, UNetConfig

ATOL = RTOL = 1e-4

SD1_LIKE = dict(
    sample_size=8,
    block_out_channels=[32, 64],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=8,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1.5,
)
SD2_LIKE = dict(
    sample_size=8,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=True,
    freq_shift=0,
    only_cross_attention=[True, False],
)
CASES = {"sd1": (SD1_LIKE, (8, 8)), "sd2-odd": (SD2_LIKE, (9, 9))}

# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 unet/config.json
SD15 = dict(presets.SD15_UNET)
SD21 = {
    **SD15,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}


def randomize(model, seed=0, std=0.1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * std)
  return model.eval()


def inputs(config, hw, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, config["in_channels"] if "in_channels" in config else 4, *hw))
  t = np.array([3, 421, 999])
  ctx = rng.standard_normal((3, 5, config["cross_attention_dim"]))
  return x.astype(np.float32), t, ctx.astype(np.float32)


def torch_out(model, x, t, ctx):
  with torch.no_grad():
    return model(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.float().numpy()


@nnx.jit
def forward(model, x, t, ctx):
  return model(x, t, ctx)


def ours_out(model, x, t, ctx):
  """NCHW in and out around our NHWC model."""
  out = forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
  return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
  cfg, hw = CASES[request.param]
  theirs = randomize(TorchUNet(**cfg), seed=len(request.param))
  d = str(tmp_path_factory.mktemp(request.param))
  theirs.save_pretrained(d, safe_serialization=True)
  ours, config = load_unet(d)
  x, t, ctx = inputs(cfg, hw)
  ref = torch_out(theirs, x, t, ctx)
  return dict(theirs=theirs, ours=ours, config=config, dir=d, x=x, t=t, ctx=ctx, ref=ref)


def test_parity(case):
  out = ours_out(case["ours"], case["x"], case["t"], case["ctx"])
  assert out.shape == case["ref"].shape
  assert np.abs(case["ref"]).max() > 0.05  # randomised weights: a non-trivial output
  np.testing.assert_allclose(out, case["ref"], atol=ATOL, rtol=RTOL)
  # Rows differ (different timesteps and texts), so a batch mix-up would show.
  assert np.abs(case["ref"][0] - case["ref"][1]).max() > 1e-2


def test_config_round_trip(case):
  config = case["config"]
  assert UNetConfig.from_diffusers(config.to_diffusers()) == config
  assert UNetConfig.from_diffusers(dict(case["theirs"].config)) == config
  with open(os.path.join(case["dir"], "config.json")) as f:
    assert UNetConfig.from_diffusers(json.load(f)) == config


def test_save_loads_in_diffusers(case, tmp_path):
  written = save_unet(str(tmp_path), case["ours"])
  assert written == ["config.json", "diffusion_pytorch_model.safetensors"]
  back = TorchUNet.from_pretrained(str(tmp_path)).eval()
  np.testing.assert_allclose(
      torch_out(back, case["x"], case["t"], case["ctx"]), case["ref"], atol=1e-6
  )
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_unet(str(tmp_path), case["ours"])


REMAT_PRIMITIVES = ("checkpoint", "remat", "remat2")  # jax.checkpoint's name across versions


def _count_remat(jaxpr):
  """jax.checkpoint equations in a jaxpr, nested ones included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in REMAT_PRIMITIVES
    for sub in jex_core.jaxprs_in_params(eqn.params):
      n += _count_remat(sub)
  return n


def test_remat_and_scalar_timesteps(case):
  """remat wraps each block (2 down, mid, 2 up) in a checkpoint and leaves the output unchanged;
  a scalar timestep broadcasts over the batch. (Gradients with and without remat agree too,
  to ~1e-8, but compiling two UNet gradients takes a minute on 2 CPU cores.)"""
  if case["config"].use_linear_projection:
    pytest.skip("one configuration is enough")
  model, x, ctx = case["ours"], case["x"], case["ctx"]
  ref = torch_out(case["theirs"], x, np.array(421), ctx)

  @nnx.jit
  def remat_scalar(m, x, ctx):
    return m(x, 421, ctx, remat=True)

  out = remat_scalar(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ctx))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=ATOL, rtol=RTOL)
  graphdef, state = nnx.split(model)
  xs = jnp.asarray(x.transpose(0, 2, 3, 1))

  def jaxpr(remat):  # the checkpoints show in the forward program already
    return jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(xs, 421, ctx, remat=remat))(state)

  assert _count_remat(jaxpr(True).jaxpr) == 5
  assert _count_remat(jaxpr(False).jaxpr) == 0
  assert UNet2DConditionModel(case["config"], remat=True, rngs=nnx.Rngs(0)).remat


def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0, 1, 17, 999], np.float32)
  for dim, flip, shift in ((32, True, 0), (33, False, 1), (8, True, 0.5)):
    ref = get_timestep_embedding(
        torch.tensor(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    ours = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip, shift))
    assert ours.shape == ref.shape == (4, dim)
    if dim % 2:
      assert not ours[:, -1].any()  # zero padding of an odd width
    # sin / cos of t f ~ 1000 rad: one float32 ulp of the argument is ~6e-5
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(ours[:3], ref[:3], atol=2e-6)


def test_variant_sharded_checkpoints(tmp_path):
  cfg, hw = CASES["sd1"]
  theirs = randomize(TorchUNet(**cfg), seed=7)
  half = str(tmp_path / "fp16")
  theirs.to(torch.float16).save_pretrained(
      half, safe_serialization=True, variant="fp16", max_shard_size="200KB"
  )
  assert os.path.exists(os.path.join(half, "diffusion_pytorch_model.safetensors.index.fp16.json"))
  with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
    load_unet(half)  # no plain weights there
  ours, _ = load_unet(half, variant="fp16")
  x, t, ctx = inputs(cfg, hw)
  ref = torch_out(theirs.float(), x, t, ctx)  # fp16-rounded weights, computed in float32
  np.testing.assert_allclose(ours_out(ours, x, t, ctx), ref, atol=ATOL, rtol=RTOL)
  # ours -> variant + shards -> diffusers
  out = str(tmp_path / "ours")
  written = save_unet(out, ours, dtype="float16", variant="fp16", max_shard_bytes=100_000)
  assert "diffusion_pytorch_model.safetensors.index.fp16.json" in written and len(written) > 3
  back = TorchUNet.from_pretrained(out, variant="fp16", torch_dtype=torch.float32).eval()
  np.testing.assert_allclose(torch_out(back, x, t, ctx), ref, atol=1e-6)
  bf16, _ = load_unet(out, variant="fp16", dtype="bfloat16")
  assert bf16.conv_in.kernel[...].dtype == jnp.bfloat16


def test_unsupported_config_fields_are_named():
  with pytest.raises(ValueError, match="addition_embed_type='text'.*only addition_embed_type=None"):
    UNetConfig.from_diffusers({**SD15, "addition_embed_type": "text"})
  with pytest.raises(ValueError, match="transformer_layers_per_block=2"):
    UNetConfig.from_diffusers({**SD15, "transformer_layers_per_block": 2})
  with pytest.raises(ValueError, match="class_embed_type"):
    UNetConfig.from_diffusers({**SD15, "class_embed_type": "timestep"})
  with pytest.raises(ValueError, match="resnet_skip_time_act=True"):
    UNetConfig.from_diffusers({**SD15, "resnet_skip_time_act": True})
  with pytest.raises(ValueError, match=r"unsupported .* field\(s\) \['bogus'\]"):
    UNetConfig.from_diffusers({**SD15, "bogus": 1})
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    UNetConfig.from_diffusers({**SD15, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})
  with pytest.raises(ValueError, match="mid_block_type"):
    UNetConfig.from_diffusers({**SD15, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
  with pytest.raises(ValueError, match="attention_head_dim"):
    UNetConfig.from_diffusers({**SD15, "attention_head_dim": [5, 10]})
  # defaults spelled out are accepted (what diffusers' save_pretrained writes)
  full = UNetConfig.from_diffusers(
      {**SD15, "transformer_layers_per_block": 1, "addition_embed_type": None, "dropout": 0.0}
  )
  assert full == UNetConfig.from_diffusers(SD15)


def test_bad_checkpoints_are_named(case, tmp_path):
  src = case["dir"]
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  config = open(os.path.join(src, "config.json")).read()

  def write(name, ts, cfg=config):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(cfg)
    save_file(ts, str(d / "diffusion_pytorch_model.safetensors"))
    return str(d)

  gone = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  with pytest.raises(CheckpointError, match=f"lacks 1 tensor.*{gone}"):
    load_unet(write("missing", {k: v for k, v in tensors.items() if k != gone}))
  bad = dict(tensors, **{"conv_in.weight": np.zeros((32, 4, 5, 5), np.float32)})
  with pytest.raises(CheckpointError, match=r"'conv_in.weight' has shape \(32, 4, 5, 5\)"):
    load_unet(write("shape", bad))
  with pytest.raises(CheckpointError, match="does not use.*extra.weight"):
    load_unet(write("extra", dict(tensors, **{"extra.weight": np.zeros(3, np.float32)})))
  with pytest.raises(CheckpointError, match="addition_embed_type"):
    cfg = json.dumps({**json.loads(config), "addition_embed_type": "text"})
    load_unet(write("config", tensors, cfg))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(CheckpointError, match=f"{empty}.*no config.json"):
    load_unet(str(empty))
  with pytest.raises(CheckpointError, match="not a directory"):
    load_unet(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "cfg, count", [(SD15, 859_520_964), (SD21, 865_910_724)], ids=["sd15", "sd21"]
)
def test_full_size_key_table_matches_diffusers(cfg, count):
  config = UNetConfig.from_diffusers(cfg)
  abstract = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
  shapes = torch_keys.param_shapes(nnx.state(abstract, nnx.Param))
  assert sum(int(np.prod(s.shape)) for s in shapes.values()) == count
  with torch.device("meta"):
    theirs = TorchUNet.from_config(cfg)
  assert sum(p.numel() for p in theirs.parameters()) == count
  expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
  table = unet_key_table(config)
  torch_keys.check_table(table, nnx.state(abstract, nnx.Param), "UNet")
  ours = {k.torch: torch_keys.torch_shape(k.layout, shapes[k.ours].shape) for k in table}
  assert ours == expected


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 1), (0, 1))])
def test_small_feature_maps_use_one_patch_product_equal_to_the_convolution(padding):
  """On the CPU, 3x3 convolutions of maps with <= 256 positions run as one matmul over the
  patches (layers._conv_as_matmul); it equals XLA's convolution to float32 rounding."""
  from alignjax.models.sd import layers

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(3, 3, 16, 24)).astype(np.float32))
  want = jax.lax.conv_general_dilated(
      x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  got = layers._conv_as_matmul(x, k, padding)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert layers._patch_matmul_applies(x, k, 1) == (jax.default_backend() == "cpu")
  assert layers._patch_matmul_applies(jnp.zeros((1, 16, 16, 16)), k, 1) == (
      jax.default_backend() == "cpu"
  )
  assert not layers._patch_matmul_applies(jnp.zeros((1, 32, 32, 16)), k, 1)
  assert not layers._patch_matmul_applies(x, k, 2)
