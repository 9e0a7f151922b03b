"""CLIP rewards: the CLIPModel loader, the LAION aesthetic predictor, CLIP score and the CLIP
preference reward against transformers / PyTorch re-implementations on tiny random models."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file

from alignjax.models.convert.clip_keys import load_clip_tokenizer, load_clip_vision
from alignjax.models.convert.clip_model import clip_model_key_table, load_clip_model
from alignjax.models.convert.safetensors_io import CheckpointError
from alignjax.models.convert.torch_keys import torch_shape
from alignjax.models.sd.clip import CLIP_MEAN, CLIP_STD, normalize_images
from alignjax.models.sd.clip_dual import CLIPModel, CLIPModelConfig, l2_normalize
from alignjax.parallel import path_str
from alignjax.rewards import clip_rewards as cr

ATOL = 1e-4
BOS, EOS = 21, 22  # ids of <|startoftext|>, <|endoftext|> in the vocabulary below
TEXT = dict(
    vocab_size=30,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=12,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=1,
)
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
)
PROMPTS = ["lower newer", "wider", "lowest lower"]


def randomize(model, seed=0, std=0.1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * std)
  return model.eval()


def write_vocab(directory):
  vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>"]
  vocab += ["t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>"]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  assert vocab.index("<|startoftext|>") == BOS and vocab.index("<|endoftext|>") == EOS
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")


class TorchAesthetic(torch.nn.Module):
  """The published MLP (improved-aesthetic-predictor), state-dict names layers.{0,2,4,6,7}."""

  def __init__(self, d):
    super().__init__()
    self.layers = torch.nn.Sequential(
        torch.nn.Linear(d, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )

  def forward(self, e):
    return self.layers(e)[:, 0]


def torch_pixels(x):
  """Our preprocessing at image_size (mean/std only), as torch NCHW."""
  x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def images(shape=(3, 32, 32, 3), seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  config = T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
  theirs = randomize(T.CLIPModel(config))
  d = str(tmp_path_factory.mktemp("clip"))
  theirs.save_pretrained(d)
  write_vocab(d)
  ours, cfg = load_clip_model(d)
  return theirs, ours, cfg, d, load_clip_tokenizer(d)


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory):
  """(torch vision tower, ours, torch MLP, its safetensors file)."""
  theirs = randomize(T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**VISION)), seed=3)
  d = str(tmp_path_factory.mktemp("vision"))
  theirs.save_pretrained(d)
  ours, _ = load_clip_vision(d)
  mlp = randomize(TorchAesthetic(VISION.get("projection_dim", 512)), seed=4)
  path = os.path.join(str(tmp_path_factory.mktemp("mlp")), "aesthetic.safetensors")
  torch_save_file(mlp.state_dict(), path)
  return theirs, ours, mlp, path


def test_clip_model_parity(clip):
  theirs, ours, cfg, _, tok = clip
  assert cfg.projection_dim == cfg.vision.projection_dim == 16
  ids = cr.CLIPScorer(ours, tok).tokenize(PROMPTS)
  x = images()
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch_pixels(x))
    want_t = theirs.text_projection(theirs.text_model(torch.from_numpy(ids.astype(np.int64)))[1])
    want_i = theirs.visual_projection(theirs.vision_model(torch_pixels(x))[1])
  pixels = normalize_images(x, 32)
  got_t, got_i, logits = nnx.jit(
      lambda m, i, p: (m.text_embeds(i), m.image_embeds(p), m.logits(i, p))
  )(ours, jnp.asarray(ids), pixels)
  np.testing.assert_allclose(got_t, want_t.numpy(), atol=ATOL)
  np.testing.assert_allclose(got_i, want_i.numpy(), atol=ATOL)
  np.testing.assert_allclose(l2_normalize(got_t), out.text_embeds.numpy(), atol=ATOL)
  np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=ATOL)
  np.testing.assert_allclose(ours.logit_scale[...], theirs.logit_scale.item(), rtol=1e-6)


def _copy_with(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)
  return str(dst)


def test_clip_model_loader_is_strict(clip, tmp_path):
  _, _, cfg, d, _ = clip
  names = {k.torch for k in clip_model_key_table(cfg)}
  assert names == set(load_file(os.path.join(d, "model.safetensors"))) - {
      "text_model.embeddings.position_ids",
      "vision_model.embeddings.position_ids",
  }
  bad = _copy_with(d, tmp_path / "missing", lambda t: t.pop("text_projection.weight"))
  with pytest.raises(CheckpointError, match="lacks 1 tensor.*text_projection.weight"):
    load_clip_model(bad)
  bad = _copy_with(d, tmp_path / "extra", lambda t: t.update(extra=np.zeros(2, np.float32)))
  with pytest.raises(CheckpointError, match="does not use.*extra"):
    load_clip_model(bad)
  bad = _copy_with(
      d, tmp_path / "shape", lambda t: t.update(logit_scale=np.zeros((1,), np.float32))
  )
  with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'logit_scale' has shape"):
    load_clip_model(bad)
  with open(os.path.join(d, "config.json")) as f:
    config = json.load(f)
  old = {**config, "text_config": {**config["text_config"], "tie_encoder_decoder": False}}
  assert CLIPModelConfig.from_hf(old) == cfg  # a transformers 4 dump's bookkeeping key
  with pytest.raises(ValueError, match="'mystery'"):
    CLIPModelConfig.from_hf({**config, "mystery": 1})
  with pytest.raises(ValueError, match="vision_config.*'mystery'"):
    CLIPModelConfig.from_hf({**config, "vision_config": {**config["vision_config"], "mystery": 1}})
  with pytest.raises(ValueError, match="model_type='clip_text_model'"):
    CLIPModelConfig.from_hf(config["text_config"])
  with pytest.raises(CheckpointError, match="no config.json"):
    load_clip_model(str(tmp_path))


def test_aesthetic_mlp_matches_torch(tmp_path):
  d = 768
  mlp = randomize(TorchAesthetic(d), seed=1)
  sd = {k: v.numpy() for k, v in mlp.state_dict().items()}
  assert sorted(sd) == sorted(f"layers.{i}.{p}" for i in "02467" for p in ("weight", "bias"))
  e = np.random.default_rng(0).normal(size=(4, d)).astype(np.float32)
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  with torch.no_grad():
    want = mlp(torch.from_numpy(e)).numpy()
  np.savez(tmp_path / "mlp.npz", **sd)
  (tmp_path / "st").mkdir()
  torch_save_file(mlp.state_dict(), str(tmp_path / "st" / "mlp.safetensors"))
  for path in (tmp_path / "mlp.npz", tmp_path / "st", str(tmp_path / "st" / "mlp.safetensors")):
    params = cr.load_aesthetic_mlp(path)
    assert params["0"]["kernel"].shape == (d, 1024) and params["7"]["bias"].shape == (1,)
    np.testing.assert_allclose(cr.aesthetic_mlp(params, e), want, rtol=1e-5, atol=1e-5)


def test_aesthetic_reward_matches_transformers(aesthetic):
  theirs, ours, mlp, path = aesthetic
  reward = cr.aesthetic_reward(ours, path)
  assert reward.differentiable and reward.name == "aesthetic"
  x = images()
  with torch.no_grad():
    e = theirs(torch_pixels(x)).image_embeds
    want = mlp(e / e.norm(dim=-1, keepdim=True)).numpy()
  got = reward(jnp.asarray(x), None)
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=ATOL)
  # other sizes: the same as transformers on our preprocessed (resized) pixels
  y = images((2, 40, 48, 3), seed=5)
  pixels = np.asarray(normalize_images(y, 32)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    e = theirs(torch.from_numpy(np.ascontiguousarray(pixels))).image_embeds
    want = mlp(e / e.norm(dim=-1, keepdim=True)).numpy()
  got, vjp = jax.vjp(reward, jnp.asarray(y))
  np.testing.assert_allclose(got, want, atol=ATOL)
  (grads,) = vjp(jnp.ones_like(got))
  assert grads.shape == y.shape and bool(jnp.all(jnp.isfinite(grads)))
  assert float(jnp.abs(grads).max()) > 0


def test_aesthetic_file_errors(aesthetic, tmp_path):
  _, ours, mlp, path = aesthetic
  sd = {k: v.numpy() for k, v in mlp.state_dict().items()}
  missing = str(tmp_path / "nothing.safetensors")
  with pytest.raises(CheckpointError, match="nothing.safetensors: no such"):
    cr.load_aesthetic_mlp(missing)
  shape = str(tmp_path / "shape.npz")
  np.savez(shape, **{**sd, "layers.4.weight": np.zeros((64, 127), np.float32)})
  with pytest.raises(CheckpointError, match=r"shape.npz: tensor 'layers.4.weight' has shape"):
    cr.load_aesthetic_mlp(shape)
  renamed = {k.replace("layers.6", "layers.5"): v for k, v in sd.items()}
  names = str(tmp_path / "names.safetensors")
  save_file(renamed, names)
  with pytest.raises(CheckpointError, match=r"names.safetensors: .*\['layers.6.weight'"):
    cr.load_aesthetic_mlp(names)
  extra = str(tmp_path / "extra.npz")
  np.savez(extra, **sd, **{"head.weight": np.zeros(1, np.float32)})
  with pytest.raises(CheckpointError, match=r"extra.npz: tensor\(s\) \['head.weight'\]"):
    cr.load_aesthetic_mlp(extra)
  pth = tmp_path / "model.pth"
  pth.write_bytes(b"")
  with pytest.raises(CheckpointError, match="model.pth: PyTorch pickles.*safetensors.torch"):
    cr.load_aesthetic_mlp(pth)
  wide = randomize(TorchAesthetic(768)).state_dict()
  np.savez(tmp_path / "wide.npz", **{k: v.numpy() for k, v in wide.items()})
  with pytest.raises(ValueError, match="768-dim embeddings.*projects to 512"):
    cr.aesthetic_reward(ours, tmp_path / "wide.npz")
  with pytest.raises(TypeError, match="CLIPVisionModelWithProjection"):
    cr.AestheticScorer(object(), path)


def test_reward_params_are_arguments(aesthetic, monkeypatch):
  _, ours, _, path = aesthetic
  traces = []
  score = cr.AestheticScorer.score

  def counting(self, params, x):
    traces.append(1)
    return score(self, params, x)

  monkeypatch.setattr(cr.AestheticScorer, "score", counting)
  scorer = cr.AestheticScorer(ours, path)
  other = jax.tree.map(lambda a: a * 1.5, scorer.params)
  x = jnp.asarray(images())
  a, b = scorer.reward()(x), scorer.reward(other)(x)
  assert len(traces) == 1 and not np.allclose(a, b)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(reward_params, x):  # a training step gets the reward's weights as an argument
    return scorer.reward(reward_params)(x)

  np.testing.assert_allclose(step(scorer.params, x), a, rtol=1e-5)
  np.testing.assert_allclose(step(other, x), b, rtol=1e-5)  # new values, no new trace


def test_clip_score_and_preference_match_transformers(clip):
  theirs, ours, _, d, tok = clip
  x = images(seed=7)
  scorer = cr.CLIPScorer(ours, tok)  # torchmetrics' CLIPScore: 100 max(cos, 0)
  ids = scorer.tokenize(PROMPTS)
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch_pixels(x))
    cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    scale = theirs.logit_scale.exp().item()
  score = scorer.reward()
  assert score.name == "clip_score" and score.differentiable
  np.testing.assert_allclose(score(x, PROMPTS), np.maximum(100 * cos, 0), atol=1e-3)
  raw = cr.CLIPScorer(ours, tok, scale=1.0, clip_at_zero=False)
  np.testing.assert_allclose(raw.reward()(x, ids), cos, atol=ATOL)  # token ids as prompts
  # a negated text projection negates every cosine (both signs of the clip at 0 are seen)
  negated = jax.tree_util.tree_map_with_path(
      lambda p, a: -a if "text_projection" in jax.tree_util.keystr(p) else a, scorer.params
  )
  np.testing.assert_allclose(
      scorer.reward(negated)(x, PROMPTS), np.maximum(-100 * cos, 0), atol=1e-3
  )
  np.testing.assert_allclose(raw.reward(negated)(x, PROMPTS), -cos, atol=ATOL)
  pref = cr.clip_preference_reward(d)  # a directory: the model and its tokenizer
  assert pref.name == "clip_preference" and pref.differentiable
  got, vjp = jax.vjp(lambda im: pref(im, ids), jnp.asarray(x))
  np.testing.assert_allclose(got, scale * cos, atol=ATOL)
  (g,) = vjp(jnp.ones_like(got))
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  with pytest.raises(ValueError, match="prompts=None"):
    score(x, None)
  with pytest.raises(ValueError, match="no tokenizer"):
    cr.clip_score_reward(ours)(x, PROMPTS)
  with pytest.raises(ValueError, match="kind="):
    cr.CLIPScorer(ours, tok, kind="nope")
  with pytest.raises(ValueError, match="got str without one"):
    score(x[:1], "a cat")


def test_full_size_clip_vit_l14_table():
  """openai/clip-vit-large-patch14's architecture (DDPO's aesthetic tower): the key table names
  exactly the tensors of transformers' CLIPModel (on the meta device), with their shapes."""
  text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
  vision = dict(
      hidden_size=1024,
      intermediate_size=4096,
      num_attention_heads=16,
      num_hidden_layers=24,
      image_size=224,
      patch_size=14,
  )
  hf = T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
  config = CLIPModelConfig.from_hf(hf.to_dict())
  with torch.device("meta"):
    meta = T.CLIPModel(hf)
  theirs = {k: tuple(v.shape) for k, v in meta.state_dict().items() if "position_ids" not in k}
  abstract = nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0)))
  ours = {
      path_str(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }
  table = clip_model_key_table(config)
  assert {k.torch: torch_shape(k.layout, ours[k.ours]) for k in table} == theirs
  assert theirs["visual_projection.weight"] == (768, 1024) and theirs["logit_scale"] == ()
