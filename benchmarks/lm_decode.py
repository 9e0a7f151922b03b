r"""Prefill and decode throughput: the alignjax sampler vs transformers' `generate` (PyTorch).

  python -m benchmarks.lm_decode            # ~100M-parameter Llama, batch 8, 128 new tokens
  python -m benchmarks.lm_decode --small    # a ~5M-parameter model, quick

Both frameworks run the same randomly initialised Llama (the transformers model is saved to a
temporary directory and loaded into alignjax with `convert.load_hf_lm`), the same prompts
(batch B of P random tokens, no padding) and the same greedy decoding without an EOS stop,
generating N tokens. Times are wall-clock, best of `--repeats` after one excluded warm-up
(which includes jit compilation):

  prefill tokens/s = B P / t_prefill          (one forward over the prompts, filling the cache)
  decode tokens/s  = B (N - 1) / (t_generate - t_prefill)                                  (1)

(the first new token comes from the prefill logits). The table also reports how many greedy
tokens agree between the two (float32 both; rare argmax flips from rounding can make later
tokens diverge).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.lm import sampling
from alignjax.models import convert
from alignjax.models.lm import init_cache

SIZES = {
    "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2048, vocab_size=32000),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=512, vocab_size=8000),
}


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up (compilation) excluded
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="a small model (quick run)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=None,
                      help="tokens to generate (default 128, or 32 with --small)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch intra-op threads (default: all cores)")
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  size = "small" if args.small else "full"
  b, p = args.batch, args.prompt_len
  n = args.new_tokens or (32 if args.small else 128)
  torch.manual_seed(0)
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  hf_config = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=p + n + 16,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch_model = transformers.LlamaForCausalLM(hf_config).eval()
  num_params = sum(x.numel() for x in torch_model.parameters())
  with tempfile.TemporaryDirectory() as d:
    torch_model.save_pretrained(d)
    model, _ = convert.load_hf_lm(d)
  graphdef, params = nnx.split(model)
  prompts = np.random.default_rng(0).integers(3, hf_config.vocab_size, size=(b, p))
  print(f"Llama {size}: {num_params / 1e6:.1f}M parameters, batch {b}, prompt {p}, "
        f"{n} new tokens, greedy, no EOS stop; devices: jax {jax.devices()[0].platform}, "
        f"torch cpu x{torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}")

  # ------------------------------------------------------------------ alignjax
  cfg = sampling.SamplingConfig(max_new_tokens=n, temperature=0.0)
  tokens, valid = jnp.asarray(prompts, jnp.int32), jnp.ones((b, p), bool)
  key = jax.random.key(0)

  @jax.jit
  def prefill(params, tokens):
    m = nnx.merge(graphdef, params)
    hidden, cache = m.hidden_states(tokens, jnp.broadcast_to(jnp.arange(p), (b, p)),
                                    jnp.ones((b, p), bool), init_cache(m.config, b, p + n))
    return m.logits(hidden[:, -1]), cache

  run_prefill = lambda: jax.block_until_ready(prefill(params, tokens))
  out = {}

  def run_generate():
    out["jax"] = jax.block_until_ready(
        sampling.sample(graphdef, params, tokens, valid, key, cfg, min_bucket=p))

  jax_prefill = best_time(run_prefill, args.repeats)
  jax_total = best_time(run_generate, args.repeats)

  # ------------------------------------------------------------------ transformers
  ids = torch.as_tensor(prompts)
  mask = torch.ones_like(ids)

  def torch_prefill():
    with torch.inference_mode():
      torch_model(input_ids=ids, attention_mask=mask, use_cache=True)

  def torch_generate():
    with torch.inference_mode():
      out["torch"] = torch_model.generate(
          input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
          do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)

  torch_pre = best_time(torch_prefill, args.repeats)
  torch_total = best_time(torch_generate, args.repeats)

  rows = []
  for name, pre, total in (("alignjax", jax_prefill, jax_total),
                           ("transformers", torch_pre, torch_total)):
    rows.append((name, b * p / pre, b * (n - 1) / (total - pre), total))  # eq. 1
  print(f"{'':14s}{'prefill tok/s':>15s}{'decode tok/s':>15s}{'generate s':>12s}")
  for name, pf, dc, total in rows:
    print(f"{name:14s}{pf:15.1f}{dc:15.1f}{total:12.2f}")
  print(f"alignjax / transformers: prefill x{rows[0][1] / rows[1][1]:.2f}, "
        f"decode x{rows[0][2] / rows[1][2]:.2f}, generate x{rows[1][3] / rows[0][3]:.2f} faster")
  ours = np.asarray(out["jax"].tokens)
  theirs = out["torch"][:, p:].numpy()
  print(f"greedy tokens equal: {np.mean(ours == theirs):.3f} "
        f"(first token {np.mean(ours[:, 0] == theirs[:, 0]):.3f})")


if __name__ == "__main__":
  main()
