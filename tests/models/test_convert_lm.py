"""HF checkpoint loading/export for the LM families: round trips through transformers,
sharded checkpoints, config quirks, and the errors for bad checkpoints."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors import safe_open

from alignjax.models.convert import (
    CheckpointError,
    SafetensorsCheckpoint,
    load_hf_lm,
    read_hf_config,
    save_hf_lm,
)
from alignjax.models.convert.safetensors_io import write_checkpoint
from alignjax.models.lm_config import ConfigTranslationError, lm_config_from_hf
from test_lm_hf_models import (
    FAMILIES,
    hf_checkpoint,
    hf_model,
    left_padded_batch,
    one_torch_thread,
)


def flat_params(model):
  return {
      "/".join(map(str, k)): np.asarray(v.get_value())
      for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def hf_logits(model, tokens, valid):
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  with torch.no_grad(), one_torch_thread():
    return model(
        input_ids=torch.tensor(tokens),
        position_ids=torch.tensor(positions),
        attention_mask=torch.tensor(valid.astype(np.int64)),
    ).logits.numpy()


def load_with_transformers(directory, dtype=torch.float32):
  with one_torch_thread():
    return T.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=dtype
    ).eval()


def copy_checkpoint(family, tmp_path, edit_config=None):
  directory = str(tmp_path / family)
  shutil.copytree(hf_checkpoint(family), directory)
  if edit_config is not None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
      d = json.load(f)
    edit_config(d)
    with open(path, "w") as f:
      json.dump(d, f)
  return directory


def rewrite_tensors(directory, edit):
  """Rewrite model.safetensors with `edit(dict name -> array)` applied."""
  ckpt = SafetensorsCheckpoint(directory)
  tensors = edit({k: np.array(ckpt.get(k)) for k in ckpt.tensors})
  del ckpt
  os.remove(os.path.join(directory, "model.safetensors"))
  write_checkpoint(
      directory,
      [(k, v.dtype, v.shape) for k, v in tensors.items()],
      tensors.__getitem__,
      max_shard_bytes=2**40,
  )


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_through_transformers(family, tmp_path):
  model, config = load_hf_lm(hf_checkpoint(family))
  assert save_hf_lm(str(tmp_path), model) == ["config.json", "model.safetensors"]
  assert read_hf_config(str(tmp_path)) == config
  original, reloaded = hf_model(family), load_with_transformers(str(tmp_path))
  assert type(reloaded) is type(original)
  expected = original.state_dict()
  for name, value in reloaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), expected[name].numpy(), err_msg=name)
  tokens, valid = left_padded_batch(seed=4)
  np.testing.assert_allclose(
      hf_logits(reloaded, tokens, valid)[valid],
      hf_logits(original, tokens, valid)[valid],
      atol=1e-6,
  )


def test_sharded_checkpoint_round_trip_and_missing_shard(tmp_path):
  model, _ = load_hf_lm(hf_checkpoint("qwen3"))
  files = save_hf_lm(str(tmp_path), model, max_shard_bytes=60_000)
  shards = [f for f in files if f.startswith("model-")]
  assert len(shards) > 2 and "model.safetensors.index.json" in files
  with open(tmp_path / "model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
  assert set(weight_map.values()) == set(shards)
  for shard in shards:
    with safe_open(str(tmp_path / shard), "np") as f:
      assert all(weight_map[k] == shard for k in f.keys())
  again, _ = load_hf_lm(str(tmp_path))
  expected, got = flat_params(model), flat_params(again)
  assert expected.keys() == got.keys()
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k])
  reloaded = load_with_transformers(str(tmp_path))
  ref = hf_model("qwen3").state_dict()
  for name, value in reloaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ref[name].numpy())

  os.remove(tmp_path / shards[1])
  with pytest.raises(CheckpointError, match=shards[1]):
    load_hf_lm(str(tmp_path))


def test_bfloat16_export_and_load(tmp_path):
  model, _ = load_hf_lm(hf_checkpoint("gemma2"))
  save_hf_lm(str(tmp_path), model, dtype="bfloat16")
  with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
    assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  model16, config16 = load_hf_lm(str(tmp_path), dtype="bfloat16")
  assert config16.dtype == "bfloat16"
  rounded = {k: v.astype(jax.numpy.bfloat16) for k, v in flat_params(model).items()}
  for k, v in flat_params(model16).items():
    assert v.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(v, rounded[k])
  reloaded = load_with_transformers(str(tmp_path), dtype=torch.bfloat16)
  assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_save_refuses_to_overwrite_and_inexpressible_configs(tmp_path):
  model, config = load_hf_lm(hf_checkpoint("gemma"))
  save_hf_lm(str(tmp_path), model)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_hf_lm(str(tmp_path), model)
  save_hf_lm(str(tmp_path), model, overwrite=True, max_shard_bytes=30_000)
  assert not os.path.exists(tmp_path / "model.safetensors")  # the stale single file is gone
  save_hf_lm(
      str(tmp_path / "extra"), model, extra_config={"attention_dropout": 0.1, "eos_token_id": 99}
  )
  with open(tmp_path / "extra" / "config.json") as f:
    written = json.load(f)
  assert written["attention_dropout"] == 0.1  # carried over
  assert written["eos_token_id"] == config.eos_token_ids[0] == 2  # the model's own value wins
  with pytest.raises(ValueError, match=r"extra_config keys \['hidden_size'\] are not harmless"):
    save_hf_lm(str(tmp_path / "extra2"), model, extra_config={"hidden_size": 3})
  model.config = dataclasses.replace(config, activation="gelu")  # HF Gemma reads "gelu" as tanh
  with pytest.raises(ConfigTranslationError, match=r"fields \['activation'\] cannot be"):
    save_hf_lm(str(tmp_path / "other"), model)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="not a directory"):
    load_hf_lm(str(tmp_path / "absent"))
  with pytest.raises(CheckpointError, match=r"not a supported checkpoint \(no config.json\)"):
    load_hf_lm(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_type": "bert"}, f)
  with pytest.raises(ConfigTranslationError, match="model_type='bert' is not supported"):
    load_hf_lm(str(tmp_path))
  shutil.copy(os.path.join(hf_checkpoint("llama"), "config.json"), tmp_path / "config.json")
  with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index"):
    load_hf_lm(str(tmp_path))


def test_unknown_and_unsupported_config_keys_are_named(tmp_path):
  with pytest.raises(ConfigTranslationError, match=r"unsupported key\(s\) \['frobnicate'\]"):
    load_hf_lm(copy_checkpoint("llama", tmp_path, lambda d: d.update(frobnicate=3)))
  base = json.load(open(os.path.join(hf_checkpoint("llama"), "config.json")))
  bad = {
      "rope_type": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
      "partial_rotary_factor": {"partial_rotary_factor": 0.5},
      "hidden_act": {"hidden_act": "tanh"},
  }
  for key, update in bad.items():
    with pytest.raises(ConfigTranslationError, match=key):
      lm_config_from_hf({**base, **update})
  gpt2 = json.load(open(os.path.join(hf_checkpoint("gpt2"), "config.json")))
  with pytest.raises(ConfigTranslationError, match="scale_attn_by_inverse_layer_idx=True"):
    lm_config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True})
  gemma2 = json.load(open(os.path.join(hf_checkpoint("gemma2"), "config.json")))
  with pytest.raises(ConfigTranslationError, match="use_bidirectional_attention=True"):
    lm_config_from_hf({**gemma2, "use_bidirectional_attention": True})
  with pytest.raises(ConfigTranslationError, match="hidden_act='relu' .*disagrees"):
    lm_config_from_hf({**gemma2, "hidden_act": "relu"})


def test_config_quirks():
  llama3 = json.load(open(os.path.join(hf_checkpoint("llama3_rope"), "config.json")))
  legacy = {k: v for k, v in llama3.items() if k != "rope_parameters"}
  scaling = dict(llama3["rope_parameters"])
  legacy.update(
      rope_theta=scaling.pop("rope_theta"),
      rope_scaling={"type": scaling.pop("rope_type"), **scaling},
  )
  assert lm_config_from_hf(legacy) == lm_config_from_hf(llama3)
  assert lm_config_from_hf(llama3).rope_type == "llama3"

  gemma = json.load(open(os.path.join(hf_checkpoint("gemma"), "config.json")))
  assert lm_config_from_hf({**gemma, "hidden_act": "gelu"}).activation == "gelu_tanh"
  assert lm_config_from_hf({**gemma, "hidden_activation": "gelu_pytorch_tanh"}).activation == (
      "gelu_tanh"
  )

  qwen2 = json.load(open(os.path.join(hf_checkpoint("qwen2"), "config.json")))
  no_types = {k: v for k, v in qwen2.items() if k != "layer_types"}
  assert lm_config_from_hf(no_types).local_layers == (1,)  # i >= max_window_layers
  off = {**no_types, "use_sliding_window": False, "sliding_window": 4096}
  assert lm_config_from_hf(off).local_layers == ()
  gpt2 = json.load(open(os.path.join(hf_checkpoint("gpt2"), "config.json")))
  assert lm_config_from_hf({**gpt2, "scale_attn_weights": False}).attention_scale == 1.0


def test_missing_unused_and_misshaped_tensors_are_named(tmp_path):
  directory = copy_checkpoint("llama", tmp_path / "a")
  rewrite_tensors(
      directory, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
  )
  with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj"):
    load_hf_lm(directory)

  directory = copy_checkpoint("llama", tmp_path / "b")
  rewrite_tensors(directory, lambda t: {**t, "model.layers.0.extra.weight": np.ones(3, "f4")})
  with pytest.raises(CheckpointError, match=r"does not use: \['model\.layers\.0\.extra"):
    load_hf_lm(directory)

  directory = copy_checkpoint("llama", tmp_path / "c", lambda d: d.update(intermediate_size=80))
  with pytest.raises(
      CheckpointError,
      match=r"model\.safetensors: tensor "
      r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 64\), "
      r"expected \(80, 64\)",
  ):
    load_hf_lm(directory)


def test_original_gpt2_layout_and_tied_copies(tmp_path):
  # The original GPT-2 release names tensors without "transformer." and stores mask buffers.
  directory = copy_checkpoint("gpt2", tmp_path / "gpt2")
  rewrite_tensors(
      directory,
      lambda t: {
          **{k.removeprefix("transformer."): v for k, v in t.items()},
          "h.0.attn.bias": np.ones((1, 1, 4, 4), "f4"),
          "h.1.attn.masked_bias": np.ones(1, "f4"),
      },
  )
  model, _ = load_hf_lm(directory)
  reference, _ = load_hf_lm(hf_checkpoint("gpt2"))
  for k, v in flat_params(reference).items():
    np.testing.assert_array_equal(flat_params(model)[k], v)

  # Tied embeddings: a stored copy of the output matrix is accepted only if it is identical.
  directory = copy_checkpoint("llama3_rope", tmp_path / "tied")
  rewrite_tensors(directory, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
  load_hf_lm(directory)
  rewrite_tensors(directory, lambda t: {**t, "lm_head.weight": t["lm_head.weight"] + 1})
  with pytest.raises(CheckpointError, match="'lm_head.weight' differs"):
    load_hf_lm(directory)
