"""CLIP text and vision towers: parity with transformers, checkpoint round trips, key tables
against full-size models on the meta device, the tokenizer, and refusals."""

import copy
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignjax.models.convert.clip_keys import (
    clip_text_key_table,
    clip_vision_key_table,
    load_clip_text,
    load_clip_tokenizer,
    load_clip_vision,
    save_clip_text,
    save_clip_vision,
    tokenize_prompts,
)
from alignjax.models.convert.safetensors_io import CheckpointError
from alignjax.models.convert.torch_keys import torch_shape
from alignjax.models.sd.clip import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPTextModel,
    CLIPVisionModelWithProjection,
    activation,
    normalize_images,
    text_embeddings,
)
from alignjax.models.sd.clip_config import CLIPTextConfig, CLIPVisionConfig
from alignjax.parallel import path_str

TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=16,
    bos_token_id=0,
    pad_token_id=1,
)
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=16,
)
ATOL = 1e-4


def randomize(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.1)
  return model.eval()


def np_of(t):
  return t.detach().float().numpy()


def token_batch(eos):
  """Right-padded rows: bos, tokens, eos, padding (row 0 pads with eos, row 1 with pad id)."""
  rng = np.random.default_rng(1)
  ids = np.ones((3, 12), np.int64)
  mask = np.zeros((3, 12), np.int64)
  for b, n in enumerate((6, 9, 12)):
    ids[b, 0] = 0
    ids[b, 1 : n - 1] = rng.integers(3, 98, n - 2)
    ids[b, n - 1] = eos
    mask[b, :n] = 1
  ids[0, 6:] = eos
  return ids, mask


@pytest.fixture(
    scope="module", params=[("quick_gelu", 2), ("gelu", 99)], ids=["qgelu-eos2", "gelu-eos99"]
)
def text(request, tmp_path_factory):
  act, eos = request.param
  theirs = randomize(T.CLIPTextModel(T.CLIPTextConfig(**TEXT, hidden_act=act, eos_token_id=eos)))
  d = str(tmp_path_factory.mktemp(f"text-{act}"))
  theirs.save_pretrained(d)
  ours, config = load_clip_text(d)
  return theirs, ours, config, d


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
  theirs = randomize(T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**VISION)), seed=3)
  d = str(tmp_path_factory.mktemp("vision"))
  theirs.save_pretrained(d)
  ours, config = load_clip_vision(d)
  return theirs, ours, config, d


def test_text_parity(text):
  theirs, ours, config, _ = text
  ids, mask = token_batch(config.eos_token_id)

  @nnx.jit
  def fwd(m, i, a):
    # diffusers' encode_prompt: clip_skip=1 is final_layer_norm(hidden_states[-2])
    skip = text_embeddings(m, i, clip_skip=1, attention_mask=a)
    return m(i, a, output_hidden_states=True), skip, text_embeddings(m, i, attention_mask=a)

  for attn in (None, mask):
    with torch.no_grad():
      want = theirs(
          torch.from_numpy(ids),
          attention_mask=None if attn is None else torch.from_numpy(attn),
          output_hidden_states=True,
      )
      want_skip = theirs.final_layer_norm(want.hidden_states[-2])
    got, skip, last = fwd(
        ours, jnp.asarray(ids, jnp.int32), None if attn is None else jnp.asarray(attn)
    )
    np.testing.assert_allclose(got.last_hidden_state, np_of(want.last_hidden_state), atol=ATOL)
    np.testing.assert_allclose(got.pooler_output, np_of(want.pooler_output), atol=ATOL)
    assert len(got.hidden_states) == len(want.hidden_states) == config.num_hidden_layers + 1
    for g, w in zip(got.hidden_states, want.hidden_states):
      np.testing.assert_allclose(g, np_of(w), atol=ATOL)
    np.testing.assert_allclose(skip, np_of(want_skip), atol=ATOL)
    np.testing.assert_allclose(last, got.last_hidden_state, atol=1e-6)
  # the pooling rule (eq. 6): argmax of ids for eos_token_id == 2, first eos otherwise
  pos = ids.argmax(-1) if config.eos_token_id == 2 else (ids == config.eos_token_id).argmax(-1)
  np.testing.assert_allclose(
      got.pooler_output, np.asarray(got.last_hidden_state)[np.arange(3), pos], atol=0
  )
  with pytest.raises(ValueError, match="clip_skip=3"):
    text_embeddings(ours, jnp.asarray(ids), clip_skip=3)


def test_text_save_round_trip(text, tmp_path):
  theirs, ours, config, _ = text
  files = save_clip_text(str(tmp_path), ours)
  assert files == ["config.json", "model.safetensors"]
  assert all(k.startswith("text_model.") for k in load_file(str(tmp_path / "model.safetensors")))
  back = T.CLIPTextModel.from_pretrained(str(tmp_path)).eval()
  assert back.config.hidden_act == config.hidden_act
  assert back.config.eos_token_id == config.eos_token_id
  a, b = theirs.state_dict(), back.state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    assert torch.equal(a[k], b[k]), k
  ours2, config2 = load_clip_text(str(tmp_path))
  assert config2 == config
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_clip_text(str(tmp_path), ours)


def test_vision_parity_and_round_trip(vision, tmp_path):
  theirs, ours, config, _ = vision
  x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  got = nnx.jit(lambda m, p: m(p))(ours, jnp.asarray(x))
  assert got.image_embeds.shape == (2, 16)
  np.testing.assert_allclose(got.image_embeds, np_of(want.image_embeds), atol=ATOL)
  np.testing.assert_allclose(got.last_hidden_state, np_of(want.last_hidden_state), atol=ATOL)
  with pytest.raises(ValueError, match="NHWC"):
    ours(jnp.zeros((1, 3, 32, 32)))
  save_clip_vision(str(tmp_path), ours)
  back = T.CLIPVisionModelWithProjection.from_pretrained(str(tmp_path)).eval()
  a, b = theirs.state_dict(), back.state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    assert torch.equal(a[k], b[k]), k


def test_normalize_images():
  img = np.random.default_rng(0).uniform(size=(2, 40, 48, 3)).astype(np.float32)
  out = normalize_images(img, 32)
  assert out.shape == (2, 32, 32, 3)
  same = normalize_images(img[:, :32, :32], 32)
  np.testing.assert_allclose(
      same, (img[:, :32, :32] - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-6
  )


def test_activations_match_transformers():
  x = np.linspace(-4, 4, 101, dtype=np.float32)
  for name in ("quick_gelu", "gelu", "gelu_new"):
    want = T.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(activation(name)(jnp.asarray(x)), want, atol=1e-6)


def test_fp16_variant_sharded_loads(text, tmp_path):
  theirs, _, config, _ = text
  half = copy.deepcopy(theirs).half()
  half.save_pretrained(str(tmp_path), variant="fp16", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.fp16.json")
  assert not os.path.exists(tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    load_clip_text(str(tmp_path))
  ours, _ = load_clip_text(str(tmp_path), variant="fp16", dtype="float16")
  emb = ours.embeddings.token_embedding.embedding[...]
  assert emb.dtype == jnp.float16
  np.testing.assert_array_equal(
      np.asarray(emb), half.embeddings.token_embedding.weight.detach().numpy()
  )
  ours32, _ = load_clip_text(str(tmp_path), variant="fp16", dtype="float32")
  w = ours32.encoder.layers[1].self_attn.q_proj.kernel[...]
  assert w.dtype == jnp.float32
  want = half.encoder.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(w), want)
  # our own sharded fp16 variant export reads back
  out = tmp_path / "ours"
  files = save_clip_text(str(out), ours, variant="fp16", max_shard_bytes=20_000)
  assert "model.safetensors.index.fp16.json" in files
  again, _ = load_clip_text(str(out), variant="fp16", dtype="float16")
  np.testing.assert_array_equal(
      np.asarray(again.embeddings.token_embedding.embedding[...]), np.asarray(emb)
  )


def _copy_with(src, dst, edit):
  shutil.copytree(src, dst)
  sd = load_file(os.path.join(dst, "model.safetensors"))
  edit(sd)
  save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return str(dst)


def test_bad_inputs(text, tmp_path):
  _, _, config, d = text
  base = config.to_hf()
  with pytest.raises(ValueError, match=r"hidden_act='relu'.*quick_gelu.*gelu"):
    CLIPTextConfig.from_hf({**base, "hidden_act": "relu"})
  with pytest.raises(ValueError, match=r"\['use_rotary'\]"):
    CLIPTextConfig.from_hf({**base, "use_rotary": True})
  with pytest.raises(ValueError, match="CLIPModel config"):
    CLIPTextConfig.from_hf({"model_type": "clip", "text_config": base})
  with pytest.raises(ValueError, match="model_type='clip_vision_model'"):
    CLIPTextConfig.from_hf({**base, "model_type": "clip_vision_model"})
  name = "embeddings.token_embedding.weight"  # transformers 5 names, unprefixed
  missing = _copy_with(d, tmp_path / "missing", lambda sd: sd.pop(name))
  with pytest.raises(CheckpointError, match="lacks 1 tensor.*embeddings.token_embedding.weight"):
    load_clip_text(missing)
  bad = _copy_with(
      d, tmp_path / "shape", lambda sd: sd.update({name: np.zeros((99, 32), np.float32)})
  )
  with pytest.raises(CheckpointError, match=r"token_embedding.weight' has shape \(99, 32\)"):
    load_clip_text(bad)
  extra = _copy_with(
      d,
      tmp_path / "extra",
      lambda sd: sd.update({"text_projection.weight": np.zeros((16, 32), np.float32)}),
  )
  with pytest.raises(CheckpointError, match="text_projection.weight"):
    load_clip_text(extra)
  ignored = _copy_with(
      d, tmp_path / "ids", lambda sd: sd.update({"embeddings.position_ids": np.arange(16)[None]})
  )
  load_clip_text(ignored)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="no config.json"):
    load_clip_text(str(tmp_path / "empty"))
  cfg = tmp_path / "relu"
  shutil.copytree(d, cfg)
  with open(cfg / "config.json", "w") as f:
    json.dump({**base, "hidden_act": "relu"}, f)
  with pytest.raises(CheckpointError, match="hidden_act='relu'"):
    load_clip_text(str(cfg))


SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    eos_token_id=2,
    bos_token_id=0,
    pad_token_id=1,
)
SD21_TEXT = dict(
    SD15_TEXT,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)
VIT_L14 = dict(
    image_size=224,
    patch_size=14,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    projection_dim=768,
    hidden_act="quick_gelu",
)


def _ours_shapes(cls, config):
  abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  return {
      path_str(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }


@pytest.mark.parametrize(
    "kind,hf,expected",
    [("text", SD15_TEXT, 123_060_480), ("text", SD21_TEXT, None), ("vision", VIT_L14, None)],
    ids=["sd15-text", "sd21-text", "vit-l14-vision"],
)
def test_full_size_counts_and_tables(kind, hf, expected):
  if kind == "text":
    config, cls, table_fn = CLIPTextConfig.from_hf(hf), CLIPTextModel, clip_text_key_table
    make = lambda: T.CLIPTextModel(T.CLIPTextConfig(**hf))  # noqa: E731
  else:
    config, cls = CLIPVisionConfig.from_hf(hf), CLIPVisionModelWithProjection
    table_fn = clip_vision_key_table
    make = lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**hf))  # noqa: E731
  shapes = _ours_shapes(cls, config)
  with torch.device("meta"):
    meta = make()
  theirs = {k: tuple(v.shape) for k, v in meta.state_dict().items() if "position_ids" not in k}
  n_ours = sum(int(np.prod(s)) for s in shapes.values())
  assert n_ours == sum(int(np.prod(s)) for s in theirs.values())
  if expected is not None:
    assert n_ours == expected
  # the key table names exactly the meta model's tensors, with its shapes
  prefix = "text_model." if any(k.startswith("text_model.") for k in theirs) else ""
  table = table_fn(config) if kind == "vision" else table_fn(config, prefix)
  assert {k.torch: torch_shape(k.layout, shapes[k.ours]) for k in table} == theirs


def _write_clip_vocab(directory):
  vocab = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>"]
  vocab += ["t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>"]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
  return {t: i for i, t in enumerate(vocab)}


def test_tokenizer(tmp_path):
  vocab = _write_clip_vocab(str(tmp_path))
  tok = load_clip_tokenizer(str(tmp_path))
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  body = tok("lower newer", add_special_tokens=False)["input_ids"]
  n = len(body) + 2
  ids = tokenize_prompts(tok, ["lower newer", "lower newer " * 4], max_length=n + 3)
  assert ids.dtype == np.int32 and ids.shape == (2, n + 3)
  assert list(ids[0, :n]) == [bos, *body, eos]
  assert all(i == tok.pad_token_id for i in ids[0, n:])
  assert ids[1, 0] == bos and ids[1, -1] == eos  # truncated to max_length, eos kept
  assert list(ids[1, 1 : n - 1]) == body
  with pytest.raises(FileNotFoundError, match="no CLIP tokenizer files"):
    load_clip_tokenizer(str(tmp_path / "nothing"))


def test_single_file_fp16_variant(text, tmp_path):
  _, ours, _, _ = text
  assert save_clip_text(str(tmp_path), ours, dtype="float16", variant="fp16") == [
      "config.json",
      "model.fp16.safetensors",
  ]
  back, _ = load_clip_text(str(tmp_path), variant="fp16", dtype="float32")
  got = back.embeddings.token_embedding.embedding.get_value()
  want = ours.embeddings.token_embedding.embedding.get_value().astype(jnp.float16)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.float32))
