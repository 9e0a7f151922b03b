"""Reward models in the transformers sequence-classification layout: parity with tiny random
`*ForSequenceClassification` models, export round trip, and clear errors for bad heads."""

import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file, save_file
from test_lm_hf_models import HF_CONFIGS, VOCAB, one_torch_thread, randomize

from alignjax.models.convert.hf_reward import HEAD_KEY, load_hf_reward, save_hf_reward
from alignjax.models.convert.safetensors_io import CheckpointError

PAD = 0
FAMILIES = ("llama", "qwen2", "gpt2")


@functools.lru_cache(maxsize=None)
def _hf_reward(family: str, root: str):
  torch.manual_seed(0)
  with one_torch_thread():
    config = HF_CONFIGS[family]()
    config.num_labels, config.pad_token_id = 1, PAD
    model = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    randomize(model, seed=1)
    model.eval()
    directory = os.path.join(root, family)
    model.save_pretrained(directory)
  return model, directory


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_reward"))


def _batch(seed=0, lengths=(7, 3, 5, 1)):
  """Right-padded (for torch) and left-padded (for alignjax) versions of the same sequences;
  real tokens never equal the pad id, so transformers' "rightmost non-pad" is the last one."""
  rng = np.random.default_rng(seed)
  b, length = len(lengths), max(lengths)
  right = np.full((b, length), PAD, np.int64)
  left = np.full((b, length), PAD, np.int32)
  left_valid = np.zeros((b, length), bool)
  for i, n in enumerate(lengths):
    seq = rng.integers(3, VOCAB, n)
    right[i, :n] = seq
    left[i, length - n :] = seq
    left_valid[i, length - n :] = True
  return right, (right != PAD).astype(np.int64), left, left_valid


def _torch_rewards(model, right, mask):
  with torch.no_grad(), one_torch_thread():
    out = model(input_ids=torch.tensor(right), attention_mask=torch.tensor(mask))
  return out.logits.numpy()[:, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_and_export_round_trip(family, root, tmp_path):
  torch_model, directory = _hf_reward(family, root)
  right, mask, left, valid = _batch()
  want = _torch_rewards(torch_model, right, mask)
  model, config = load_hf_reward(directory)
  assert config.family == family and model.backbone.lm_head is None
  np.testing.assert_allclose(np.asarray(model(left, valid)), want, atol=1e-4, rtol=1e-4)

  files = save_hf_reward(str(tmp_path), model)
  assert files[0] == "config.json"
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["architectures"] == [type(torch_model).__name__]
  assert saved["pad_token_id"] == PAD and saved["id2label"] == {"0": "LABEL_0"}
  with one_torch_thread():
    back = T.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
  assert back.num_labels == 1
  np.testing.assert_allclose(_torch_rewards(back, right, mask), want, atol=1e-5, rtol=1e-5)
  again, _ = load_hf_reward(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(again(left, valid)), np.asarray(model(left, valid)))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_hf_reward(str(tmp_path), model)


def _copy(directory, dst, *, config=None, tensors=None):
  shutil.copytree(directory, dst)
  if config is not None:
    with open(os.path.join(dst, "config.json")) as f:
      d = json.load(f)
    config(d)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(d, f)
  if tensors is not None:
    path = os.path.join(dst, "model.safetensors")
    t = load_file(path)
    tensors(t)
    save_file(t, path)
  return str(dst)


def test_bad_heads_are_refused_naming_key_and_file(root, tmp_path):
  _, directory = _hf_reward("llama", root)

  def two_labels(d):
    d["id2label"], d["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}

  bad = _copy(directory, tmp_path / "labels", config=two_labels)
  with pytest.raises(CheckpointError, match=r"config\.json: num_labels=2 \(from id2label\)"):
    load_hf_reward(bad)

  def explicit(d):
    d["num_labels"] = 3

  bad = _copy(directory, tmp_path / "explicit", config=explicit)
  with pytest.raises(CheckpointError, match=r"num_labels=3 \(from num_labels\)"):
    load_hf_reward(bad)
  bad = _copy(directory, tmp_path / "nohead", tensors=lambda t: t.pop(HEAD_KEY))
  with pytest.raises(CheckpointError, match="no 'score.weight'"):
    load_hf_reward(bad)

  def wide(t):
    t[HEAD_KEY] = np.zeros((2, t[HEAD_KEY].shape[1]), np.float32)

  bad = _copy(directory, tmp_path / "shape", tensors=wide)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'score.weight' has shape"):
    load_hf_reward(bad)

  def causal(d):
    d["architectures"] = ["LlamaForCausalLM"]

  bad = _copy(directory, tmp_path / "causal", config=causal)
  with pytest.raises(CheckpointError, match="not a sequence-classification"):
    load_hf_reward(bad)

  def lm_head(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"]

  bad = _copy(directory, tmp_path / "extra", tensors=lm_head)
  with pytest.raises(CheckpointError, match="does not use.*lm_head.weight"):
    load_hf_reward(bad)
