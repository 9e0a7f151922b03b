"""LoRA of `TransformerLM` <-> PEFT adapters (alignjax.models.convert.peft_lora): logits of
PEFT's LoRA model on tiny random transformers models equal our merged-LoRA logits."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as T
from flax import nnx

from alignjax.models import lora
from alignjax.models.convert import CheckpointError, load_hf_lm, read_hf_config
from alignjax.models.convert import peft_lora
from alignjax.models.lm import forward
from test_lm_hf_models import hf_checkpoint, left_padded_batch, one_torch_thread

RANK, ALPHA = 4, 6.0


@functools.lru_cache(maxsize=None)
def ours(family):
  model, config = load_hf_lm(hf_checkpoint(family))
  return model, config


def fresh_hf(family):
  """A new transformers model (PEFT modifies the model it wraps)."""
  return T.AutoModelForCausalLM.from_pretrained(
      hf_checkpoint(family), attn_implementation="eager", dtype=torch.float32
  ).eval()


def random_lora(model, modules, seed=0):
  """Kaiming-uniform A (as PEFT) and a non-zero random B, so the adapter changes the model."""
  lp = lora.init_lm_lora(model, RANK, jax.random.key(seed), modules=modules)
  rng = np.random.default_rng(seed)
  return {
      k: {"a": v["a"], "b": jnp.asarray(0.5 * rng.normal(size=v["b"].shape), jnp.float32)}
      for k, v in lp.items()
  }


_forward = jax.jit(forward, static_argnums=0)


def our_logits(model, lp, tokens, valid, **merge_kwargs):
  graphdef, params = nnx.split(model)
  merged = lora.merge_lora(params, lp, **merge_kwargs)
  logits, _ = _forward(graphdef, merged, jnp.asarray(tokens), None, jnp.asarray(valid))
  return np.asarray(logits)


def hf_logits(hf, tokens, valid):
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  with torch.no_grad(), one_torch_thread():
    return hf(
        input_ids=torch.tensor(tokens),
        attention_mask=torch.tensor(valid.astype(np.int64)),
        position_ids=torch.tensor(positions),
    ).logits.numpy()


MODULES = {
    "llama": ("q", "k", "v", "o", "gate", "up", "down", "lm_head"),
    "gemma": ("q", "k", "v", "o", "gate", "up", "down"),  # tied embeddings: no lm_head
}


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_peft_model_matches_merged_lora(family, tmp_path):
  model, config = ours(family)
  lp = random_lora(model, MODULES[family])
  files = peft_lora.save_peft_adapter(
      str(tmp_path), config, lp, alpha=ALPHA, base_model_name_or_path="tiny-" + family
  )
  assert files == ["adapter_config.json", "adapter_model.safetensors"]
  with open(tmp_path / "adapter_config.json") as f:
    cfg = json.load(f)
  assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
  assert cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA
  names = {"lm_head": "lm_head"} | {m: m + "_proj" for m in MODULES["gemma"]}
  assert cfg["target_modules"] == sorted(names[m] for m in MODULES[family])
  # Torch layout: lora_A [r, in], lora_B [out, r].
  tensors = peft_lora._read_safetensors(str(tmp_path / "adapter_model.safetensors"))
  key = "base_model.model.model.layers.1.self_attn.o_proj.lora_{}.weight"
  n_d = config.num_heads * config.head_dim
  assert tensors[key.format("A")].shape == (RANK, n_d)
  assert tensors[key.format("B")].shape == (config.hidden_size, RANK)
  assert len(tensors) == 2 * len(lp)

  tokens, valid = left_padded_batch(seed=2)
  want = our_logits(model, lp, tokens, valid, alpha=ALPHA)
  with one_torch_thread():
    peft_model = peft.PeftModel.from_pretrained(fresh_hf(family), str(tmp_path)).eval()
  got = hf_logits(peft_model, tokens, valid)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
  base = our_logits(model, {}, tokens, valid)
  assert np.abs(want - base)[valid].max() > 0.5  # the adapter matters

  # Merged export: a plain transformers checkpoint with the same logits.
  merged_dir = str(tmp_path / "merged")
  peft_lora.save_merged_hf_lm(merged_dir, model, lp, alpha=ALPHA)
  got = hf_logits(fresh_hf_dir(merged_dir), tokens, valid)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)

  # Round trip through our loader gives back the same factors and scale.
  back, kwargs = peft_lora.load_peft_adapter(str(tmp_path), config)
  assert kwargs == {"alpha": ALPHA, "rslora": False} and back.keys() == lp.keys()
  for k in lp:
    for x in "ab":
      np.testing.assert_array_equal(np.asarray(back[k][x]), np.asarray(lp[k][x]))


def fresh_hf_dir(directory):
  return T.AutoModelForCausalLM.from_pretrained(
      directory, attn_implementation="eager", dtype=torch.float32
  ).eval()


def test_loads_an_adapter_saved_by_peft(tmp_path):
  """PEFT's own save (rsLoRA, attention only, random B) loads into an equal merged model."""
  family = "qwen2"
  model, config = ours(family)
  torch.manual_seed(0)
  with one_torch_thread():
    cfg = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(fresh_hf(family), cfg).eval()
    with torch.no_grad():
      for name, p in pm.named_parameters():
        if "lora_B" in name:
          p.copy_(0.5 * torch.randn(p.shape))
    pm.save_pretrained(str(tmp_path))
  lp, kwargs = peft_lora.load_peft_adapter(str(tmp_path), config)
  assert kwargs == {"alpha": ALPHA, "rslora": True}
  assert set(lp) == {f"layers/{i}/attn/{m}/kernel" for i in range(2) for m in "qvo"}
  tokens, valid = left_padded_batch(seed=3)
  want = hf_logits(pm, tokens, valid)
  got = our_logits(model, lp, tokens, valid, **kwargs)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)


def test_partial_layers_export_as_a_regex(tmp_path):
  model, config = ours("llama")
  lp = random_lora(model, ("q",))
  lp = {k: v for k, v in lp.items() if k.startswith("layers/1/")}
  peft_lora.save_peft_adapter(str(tmp_path), config, lp)
  with open(tmp_path / "adapter_config.json") as f:
    cfg = json.load(f)
  assert cfg["target_modules"] == r"(model\.layers\.1\.self_attn\.q_proj)"
  assert cfg["lora_alpha"] == RANK  # alpha=None: scale 1
  back, kwargs = peft_lora.load_peft_adapter(str(tmp_path), config)
  assert set(back) == {"layers/1/attn/q/kernel"} and kwargs["alpha"] == RANK
  tokens, valid = left_padded_batch(seed=4)
  with one_torch_thread():
    pm = peft.PeftModel.from_pretrained(fresh_hf("llama"), str(tmp_path)).eval()
  assert sum("lora_A" in n for n, _ in pm.named_parameters()) == 1  # layer 1's q_proj only
  want = our_logits(model, lp, tokens, valid)
  np.testing.assert_allclose(hf_logits(pm, tokens, valid)[valid], want[valid], atol=1e-4, rtol=0)


def test_bad_adapters_are_refused(tmp_path):
  model, config = ours("llama")
  lp = random_lora(model, ("q", "down"))
  d = str(tmp_path)
  peft_lora.save_peft_adapter(d, config, lp, alpha=ALPHA)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    peft_lora.save_peft_adapter(d, config, lp)
  with pytest.raises(ValueError, match=r"\['bogus/kernel'\] are not PEFT-adaptable"):
    peft_lora.save_peft_adapter(d, config, {**lp, "bogus/kernel": lp["layers/0/attn/q/kernel"]})
  wrong = {"layers/0/attn/q/kernel": lp["layers/0/mlp/down/kernel"]}
  with pytest.raises(ValueError, match="needs A"):
    peft_lora.save_peft_adapter(d, config, wrong, overwrite=True)

  def edit_config(**changes):
    with open(os.path.join(d, "adapter_config.json")) as f:
      cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
      json.dump(cfg, f)

  edit_config(use_dora=True)
  with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
    peft_lora.load_peft_adapter(d, config)
  edit_config(use_dora=False, target_modules=["q_proj", "down_proj", "up_proj"])
  with pytest.raises(CheckpointError, match=r"missing \['base_model.model.model.layers.0.mlp.up"):
    peft_lora.load_peft_adapter(d, config)
  edit_config(target_modules=["q_proj"])
  with pytest.raises(CheckpointError, match=r"unknown \['base_model.model.model.layers.0.mlp.down"):
    peft_lora.load_peft_adapter(d, config)
  edit_config(target_modules=["nothing"])
  with pytest.raises(CheckpointError, match="selects no module"):
    peft_lora.load_peft_adapter(d, config)
  edit_config(target_modules=["q_proj", "down_proj"], r=RANK + 1)
  with pytest.raises(CheckpointError, match="expected"):
    peft_lora.load_peft_adapter(d, config)
  edit_config(peft_type="IA3")
  with pytest.raises(CheckpointError, match="only 'LORA'"):
    peft_lora.load_peft_adapter(d, config)
  with pytest.raises(CheckpointError, match="not a PEFT adapter"):
    peft_lora.load_peft_adapter(str(tmp_path / "nowhere"), config)


def test_gpt2_is_refused_with_the_reason():
  config = read_hf_config(hf_checkpoint("gpt2"))
  with pytest.raises(NotImplementedError, match="fuses q, k and v into one"):
    peft_lora.lora_modules(config)
