"""Tiny random transformers models, one per supported LM family variant (shared by the
LM parity, sharding and conversion tests), and checks of their config translation."""

import atexit
import contextlib
import functools
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
import transformers as T

from alignjax.models.lm_config import lm_config_from_hf

VOCAB = 128
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

HF_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_BASE, rope_theta=1000.0),
    "llama3_rope": lambda: T.LlamaConfig(
        **_BASE,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2": lambda: T.Qwen2Config(
        **_BASE, use_sliding_window=True, sliding_window=5, max_window_layers=1
    ),
    "qwen3": lambda: T.Qwen3Config(**_BASE, head_dim=24, attention_bias=True),
    "gemma": lambda: T.GemmaConfig(**{**_BASE, "num_key_value_heads": 1}, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(
        **_BASE,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=8.0,
        final_logit_softcapping=10.0,
    ),
    "gpt2": lambda: T.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
FAMILIES = tuple(HF_CONFIGS)

_ROOT = tempfile.mkdtemp(prefix="alignjax_lm_test_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@contextlib.contextmanager
def one_torch_thread():
  """Tiny torch models run far faster single-threaded on a shared CPU."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(before)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
  """Replace HF's small init by O(1)-scale random weights so every parameter matters."""
  g = torch.Generator().manual_seed(seed)
  offset = model.config.model_type in ("gemma", "gemma2")
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name or ".ln_" in name:
        if name.endswith("bias"):
          p.copy_(0.1 * noise)
        else:
          p.copy_((0.0 if offset and "ln_" not in name else 1.0) + 0.1 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[-1]))


@functools.lru_cache(maxsize=None)
def hf_checkpoint(family: str) -> str:
  """Directory with a saved tiny random model of `family` (built once per session)."""
  torch.manual_seed(0)
  with one_torch_thread():
    config = HF_CONFIGS[family]()
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model)
    directory = os.path.join(_ROOT, family)
    model.save_pretrained(directory)
  return directory


@functools.lru_cache(maxsize=None)
def hf_model(family: str):
  """The saved model reloaded by transformers (float32, eval mode)."""
  return T.AutoModelForCausalLM.from_pretrained(
      hf_checkpoint(family), attn_implementation="eager", dtype=torch.float32
  ).eval()


def left_padded_batch(seed=0, lengths=(12, 9, 5), total=12):
  """Random tokens [B, total] with left padding (pad id 0) and the valid mask."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), total), np.int64)
  valid = np.zeros((len(lengths), total), bool)
  for i, n in enumerate(lengths):
    tokens[i, total - n :] = rng.integers(3, VOCAB, n)
    valid[i, total - n :] = True
  return tokens, valid


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_config_translates(family):
  with open(os.path.join(hf_checkpoint(family), "config.json")) as f:
    d = json.load(f)
  c = lm_config_from_hf(d)
  hf = hf_model(family).config
  assert c.vocab_size == VOCAB and c.num_layers == 2
  assert c.num_heads == hf.num_attention_heads
  assert c.head_dim * c.num_heads == hf.num_attention_heads * getattr(
      hf, "head_dim", hf.hidden_size // hf.num_attention_heads
  )
  expected_local = {"qwen2": (1,), "gemma2": (0,)}.get(family, ())
  assert c.local_layers == expected_local
  assert c.tie_embeddings == hf.tie_word_embeddings
