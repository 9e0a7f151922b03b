r"""One DPO training step: alignjax (jitted, state donated) vs the same step in PyTorch on transformers.

  python -m benchmarks.lm_train_step --threads=1   # ~134M-parameter Llama, 8 pairs x 256 tokens
  python -m benchmarks.lm_train_step --small       # a ~5M-parameter model, quick
  python -m benchmarks.lm_train_step --profile     # also: where each framework's step time goes

Both frameworks run the same randomly initialised Llama (the transformers model is saved to a
temporary directory and loaded into alignjax with `convert.load_hf_lm`), on the same inputs, all
in float32 with each framework's default matmul precision: B pairs of random token ids, L tokens
each side (chosen and rejected), the first P tokens of every row the prompt (not scored), the
rest the response (scored), no padding.

One step, the same maths in both (as TRL's DPOTrainer does it without precomputed reference
log-probs: chosen and rejected concatenated into one batch of 2B rows):
  1. reference: log π_ref(y) of the 2B rows under a frozen copy of the initial weights, no
     gradient (alignjax: `scoring.score(...).sums` of the reference parameters under
     `stop_gradient`; PyTorch: a forward of the second model copy under `torch.no_grad()`);
  2. policy: the same scores of the 2B rows under the trained weights, with their gradient
     (alignjax: `scoring.score` inside `jax.value_and_grad`; PyTorch: one forward of
     `LlamaForCausalLM` giving the [2B, L, V] logits, log_softmax of the shifted logits gathered
     at the labels (the ids, -100 in the prompt) and summed per row, as TRL's `get_batch_logps`
     does, then `loss.backward()`). alignjax's scorer gets `start=P` (in 1. too): the output
     matrix and the log-softmax only at the 2B (L - P) response slots, the network over all
     L; `--score_all_slots` gives it start=0, every slot, as the PyTorch side computes;
  3. the DPO loss, −mean log σ(β((π_c − ref_c) − (π_r − ref_r))) with β = 0.1
     (`alignjax.algorithms.dpo.dpo_loss`; PyTorch: the same formula written here);
  4. AdamW, lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0 (TRL's default), no gradient
     clipping (alignjax: `optax.adamw` through `training.TrainState.apply_gradients`, the whole
     step one `jax.jit` with the state donated, as `experiments.lm_offline`'s `update`;
     PyTorch: `torch.optim.AdamW` (its default implementation for CPU tensors unless
     `--torch_adamw` says otherwise), `step()` then `zero_grad(set_to_none=True)`).

Like for like:
  - threads: the whole process is pinned to `--threads` cores (sched_setaffinity) before either
    framework starts its thread pools; torch gets set_num_threads(threads) and XLA:CPU sizes
    its intra-op pool from the same affinity mask. No XLA flag is set.
  - timing: wall clock around one whole step, ending with `block_until_ready` on the new state
    (alignjax) or with the optimizer's `zero_grad` and the loss as a Python float (PyTorch);
    two untimed warm-up steps each first (jit compilation, allocator and first-call costs
    excluded; they also give the agreement check below); the repeats are interleaved
    (alignjax, PyTorch, alignjax, ...) so that load from other processes hits both alike, and
    the best of `--repeats` is kept. The load average is printed before and after.

  steps/s = 1 / t_step;   scoring tokens/s = 2 (2B L) / t_step                               (1)

(2B L tokens scored by the policy and again by the reference; the prompt positions go through
the network too, so they count). The nominal FLOP/s divides 4 forward-equivalents (reference
forward, policy forward, a backward of twice a forward) of 2 N_mm flops per token plus the
attention products (full L x L, 4 L d per token and layer) by t_step, N_mm = the parameters
outside the input embedding.

Agreement check (same weights, same inputs): the policy's per-row log-prob sums of the first
step (relative difference), and the losses of steps 1 and 2. At step 1 the policy equals the
reference, so both losses are log 2 up to rounding (the policy's and the reference's scores are
different programs); step 2's loss is the first to depend on the gradients and the update. The parameters are checked to have moved away from the reference.

`--profile` times the parts of a step separately, each its own jitted program for alignjax
(each ending with `block_until_ready`), interleaved and best-of as above: (a) the policy's
forward + backward (scores, DPO loss against fixed reference scores, gradient), (b) the
reference's forward (no gradient), (c) the optimizer update alone (alignjax: `apply_gradients`
with the state donated; PyTorch: `step()` then `zero_grad(set_to_none=True)`).

Before (measured on the 2-core AMD EPYC this project is developed on, full size, 134.1M
parameters, 8 pairs x 256 tokens, --threads=2, 3 interleaved repeats, load average 2.1 before
and 1.9 after: the benchmark's own two threads):

  alignjax 73.7 s/step (111 scoring tok/s), PyTorch 56.2 s/step (146): x0.76 (medians x0.77)

Agreement: per-row log-prob sums 1.2e-7 relative; step-2 loss 1.1e-5 relative.

Where the policy's forward + backward went (before `score`'s start and eq. 5 gradient; one
`jax.profiler` trace of `jax.grad` of the scores, full size, per-op times summed, taken under
load 7.5, so shares only): 84.7 s of op time, of which the output-matrix head ~20% (its
[4080, 32000] logits product fused with the max 6.9 s, dz W^T 3.1 s, a transposed copy of dz
[32000, 4080] for dW 5.4 s, the gather's gradient scattered into zeros [16, 255, 32000] and
the log-softmax passes ~1 s), attention ~20% (the [16, 12, 256, 256] score and softmax ops and
their head-major [16, 12, 64, 256] operands: 4% of the flops), transposed copies of the MLP
activation gradients for the weight gradients ([2048, 4096], ~0.5 s each, 24 of them) ~14%,
the other matmuls and elementwise ops (norms, RoPE, SiLU) the remaining ~37%. The AdamW
update is not in it (not traced). Since then `scoring.score` applies the output matrix
only from `start` on (here 3072 rows, not 4080) and writes the head's gradient out (eq. 5 of
`alignjax.lm.scoring`: one pass over [N, V], no scatter, no transposed copy).

After (the same machine, `python -m benchmarks.lm_train_step --threads=2 --repeats=2`, load
average 0.5 before and 5.0 after: other jobs started during the run, so the best-of figures
are indicative):

  alignjax 35.5 s/step (231 scoring tok/s), PyTorch 30.6 s/step (267): x0.86 (medians x1.29)

Agreement: sums 6.0e-8 relative; step-2 loss 9.0e-8 relative. Still open: the MLP and
attention weight-gradient copies come from `lm_layers.dense_product` contracting a [B, L, H]
operand (its tensordot fallback; a [B L, H] dot has none), and attention's [L, L] ops.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

# The model shapes, thread pinning and timer of the decode benchmark: both time the same Llama.
from benchmarks.lm_decode import SIZES, pin_threads, timed

BETA = 0.1
LEARNING_RATE = 1e-5
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
      "--size",
      choices=tuple(SIZES),
      default="full",
      help="model shape: full (~134M, the CPU target), small (quick)",
  )
  parser.add_argument("--small", action="store_true", help="same as --size=small")
  parser.add_argument("--batch", type=int, default=8, help="pairs per step (2x rows scored)")
  parser.add_argument("--seq_len", type=int, default=256, help="tokens per row, each side")
  parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens (not scored)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
      "--threads",
      "--torch_threads",
      type=int,
      default=None,
      help="cores for both frameworks (default: all allowed)",
  )
  parser.add_argument(
      "--torch_adamw",
      choices=("default", "foreach", "fused"),
      default="default",
      help="torch.optim.AdamW's implementation (default: what torch picks, the for-loop one "
      "for CPU tensors)",
  )
  parser.add_argument("--profile", action="store_true", help="also time the parts of a step")
  parser.add_argument(
      "--score_all_slots",
      action="store_true",
      help="alignjax: apply the output matrix at every slot (score's start=0), not only from "
      "the response on",
  )
  args = parser.parse_args()
  threads = pin_threads(args.threads)
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  import torch.nn.functional as F
  import transformers
  from flax import nnx

  from alignjax import training
  from alignjax.algorithms import dpo
  from alignjax.lm import scoring
  from alignjax.models import convert
  # pylint: enable=import-outside-toplevel

  size = "small" if args.small else args.size
  b, l, p = args.batch, args.seq_len, args.prompt_len
  if not 1 <= p < l:
    raise SystemExit(f"--prompt_len={p}: must lie in [1, --seq_len={l})")
  torch.manual_seed(0)
  torch.set_num_threads(threads)
  hf_config = transformers.LlamaConfig(
      **SIZES[size],
      max_position_embeddings=l + 16,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
  )
  policy = transformers.LlamaForCausalLM(hf_config)
  num_params = sum(x.numel() for x in policy.parameters())
  with tempfile.TemporaryDirectory() as d:
    policy.save_pretrained(d)
    model, _ = convert.load_hf_lm(d)
  reference = copy.deepcopy(policy).eval().requires_grad_(False)
  policy.train()  # Llama has no dropout: train() and eval() compute the same
  graphdef, params = nnx.split(model)

  rng = np.random.default_rng(0)
  ids = rng.integers(
      3, hf_config.vocab_size, size=(2 * b, l)
  )  # rows [0, B) chosen, [B, 2B) rejected
  mask = np.zeros((2 * b, l), np.int32)
  mask[:, p:] = 1
  n_mm = num_params - hf_config.vocab_size * hf_config.hidden_size  # all but the input embedding
  attn = 4 * l * hf_config.hidden_size * hf_config.num_hidden_layers  # per token, QK^T and PV
  flops = 4 * (2 * n_mm + attn) * 2 * b * l  # eq. (1)'s text: 4 forward-equivalents
  print(
      f"Llama {size}: {num_params / 1e6:.1f}M parameters, float32, DPO step on {b} pairs x {l} "
      f"tokens each side (prompt {p}, response {l - p}, no padding), beta {BETA}, AdamW lr "
      f"{LEARNING_RATE}; {threads} thread(s) for both (process pinned to cores "
      f"{sorted(os.sched_getaffinity(0))}; torch x{torch.get_num_threads()}); "
      f"jax {jax.__version__} {jax.devices()[0].platform}, torch {torch.__version__}, "
      f"transformers {transformers.__version__} (attention {policy.config._attn_implementation}); "
      f"load average {os.getloadavg()[0]:.1f}"
  )

  # ------------------------------------------------------------------ alignjax
  optimizer = optax.adamw(
      LEARNING_RATE, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY
  )
  ref_params = jax.tree.map(lambda x: x.copy(), params)  # own buffers: the state is donated
  state = training.TrainState.create(params, optimizer, jax.random.key(0))
  del params, model
  batch = (
      jnp.asarray(ids, jnp.int32),
      jnp.ones((2 * b, l), bool),
      jnp.asarray(mask, bool),
  )

  start = 0 if args.score_all_slots else p  # the prompt's slots are not scored

  def policy_loss(trainable, ref_sums, batch):
    sums = scoring.score(graphdef, trainable, *batch, start=start).sums
    loss, _ = dpo.dpo_loss(sums[:b], sums[b:], ref_sums[:b], ref_sums[b:], beta=BETA)
    return loss, sums

  def reference_sums(ref_params, batch):
    return jax.lax.stop_gradient(scoring.score(graphdef, ref_params, *batch, start=start).sums)

  def update(state, ref_params, batch):
    ref_sums = reference_sums(ref_params, batch)
    (loss, sums), grads = jax.value_and_grad(policy_loss, has_aux=True)(
        state.params, ref_sums, batch
    )
    return state.apply_gradients(grads, optimizer), loss, sums

  update_fn = jax.jit(update, donate_argnums=0)
  jax_state = {"state": state}
  del state

  def jax_step():
    new, loss, sums = update_fn(jax_state["state"], ref_params, batch)
    jax_state["state"] = jax.block_until_ready(new)
    return float(loss), np.asarray(sums)

  # ------------------------------------------------------------------ PyTorch
  t_ids = torch.as_tensor(ids)
  t_attn = torch.ones_like(t_ids)
  t_labels = t_ids.masked_fill(torch.as_tensor(mask) == 0, -100)
  adamw_kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
  torch_opt = torch.optim.AdamW(
      policy.parameters(),
      lr=LEARNING_RATE,
      betas=BETAS,
      eps=EPS,
      weight_decay=WEIGHT_DECAY,
      **adamw_kwargs[args.torch_adamw],
  )

  def torch_sums(net):
    """Per-row sums of log π(y_t | y_<t) over the response (TRL's get_batch_logps)."""
    logits = net(input_ids=t_ids, attention_mask=t_attn).logits[:, :-1]  # [2B, L-1, V] float32
    labels = t_labels[:, 1:]
    scored = labels != -100
    lp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (lp * scored).sum(-1)

  def torch_dpo(sums, ref):
    h = (sums[:b] - ref[:b]) - (sums[b:] - ref[b:])
    return -F.logsigmoid(BETA * h).mean()

  def torch_reference():
    with torch.no_grad():
      return torch_sums(reference)

  def torch_step():
    ref = torch_reference()
    sums = torch_sums(policy)
    loss = torch_dpo(sums, ref)
    loss.backward()
    torch_opt.step()
    torch_opt.zero_grad(set_to_none=True)
    return loss.item(), sums.detach().numpy()

  # ------------------------------------------------------------------ agreement
  first = {"alignjax": jax_step(), "PyTorch": torch_step()}  # warm-up 1 (compiles)
  second = {"alignjax": jax_step(), "PyTorch": torch_step()}  # warm-up 2
  (l1j, sj), (l1t, st) = first["alignjax"], first["PyTorch"]
  (l2j, _), (l2t, _) = second["alignjax"], second["PyTorch"]
  rel_sums = np.max(np.abs(sj - st)) / np.max(np.abs(st))
  print(
      f"agreement: policy log-prob sums (step 1) max |jax - torch| / max |torch| {rel_sums:.1e} "
      f"(|sum| ~ {np.mean(np.abs(st)):.1f}); loss step 1 {l1j:.7f} vs {l1t:.7f} "
      f"(|diff| {abs(l1j - l1t):.1e}, log 2 = {np.log(2):.7f}); loss step 2 {l2j:.7f} vs "
      f"{l2t:.7f} (|diff| {abs(l2j - l2t):.1e}, relative {abs(l2j - l2t) / abs(l2t):.1e})"
  )
  moved_jax = training.tree_max_abs_diff(jax_state["state"].params, ref_params)
  with torch.no_grad():
    moved_torch = max(
        (a - r).abs().max().item() for a, r in zip(policy.parameters(), reference.parameters())
    )
  print(
      f"parameters moved after 2 steps: alignjax max |θ - θ_ref| {moved_jax:.1e}, "
      f"PyTorch {moved_torch:.1e} (lr {LEARNING_RATE}: ~2 lr expected)"
  )
  if not (moved_jax > 0 and moved_torch > 0):
    raise SystemExit("parameters did not change")

  # ------------------------------------------------------------------ timing
  fns = {"alignjax": jax_step, "PyTorch": torch_step}
  times = {name: [] for name in fns}
  for _ in range(args.repeats):  # interleaved
    for name, fn in fns.items():
      times[name].append(timed(fn))
  best = {name: min(t) for name, t in times.items()}
  tokens = 2 * (2 * b * l)  # eq. (1)
  print(f"{'':10s}{'steps/s':>10s}{'step s':>10s}{'scoring tok/s':>15s}{'nominal GFLOP/s':>17s}")
  for name, t in best.items():
    print(f"{name:10s}{1 / t:10.3f}{t:10.3f}{tokens / t:15.1f}{flops / t / 1e9:17.1f}")
  print(
      f"alignjax / PyTorch: steps/s x{best['PyTorch'] / best['alignjax']:.2f} "
      f"(medians x{np.median(times['PyTorch']) / np.median(times['alignjax']):.2f}); "
      f"{flops / 1e9:.1f} nominal GFLOP per step"
  )

  # ------------------------------------------------------------------ profile
  if args.profile:
    ref_sums = jax.jit(reference_sums)
    fwd_bwd = jax.jit(jax.value_and_grad(policy_loss, has_aux=True))
    apply = jax.jit(lambda state, grads: state.apply_gradients(grads, optimizer), donate_argnums=0)
    fixed_ref = jax.block_until_ready(ref_sums(ref_params, batch))
    held = {}

    def jax_ref():
      jax.block_until_ready(ref_sums(ref_params, batch))

    def jax_fwd_bwd():
      held["grads"] = jax.block_until_ready(fwd_bwd(jax_state["state"].params, fixed_ref, batch))[1]

    def jax_update():
      jax_state["state"] = jax.block_until_ready(apply(jax_state["state"], held["grads"]))

    t_fixed_ref = torch_reference()

    def torch_fwd_bwd():
      torch_dpo(torch_sums(policy), t_fixed_ref).backward()

    def torch_update():
      torch_opt.step()
      torch_opt.zero_grad(set_to_none=True)

    parts = {
        "alignjax": (jax_fwd_bwd, jax_ref, jax_update),
        "PyTorch": (torch_fwd_bwd, torch_reference, torch_update),
    }
    for fn_parts in parts.values():  # warm-up (compiles), in step order (grads before update)
      for fn in fn_parts:
        fn()
    ptimes = {name: [[] for _ in fn_parts] for name, fn_parts in parts.items()}
    for _ in range(args.repeats):  # interleaved
      for name, fn_parts in parts.items():
        for i, fn in enumerate(fn_parts):
          ptimes[name][i].append(timed(fn))
    pbest = {name: [min(t) for t in ts] for name, ts in ptimes.items()}
    labels = ("(a) policy forward + backward", "(b) reference forward", "(c) AdamW update")
    print(f"{'where the time goes (best s)':32s}{'alignjax':>10s}{'PyTorch':>10s}{'x':>7s}")
    rows = list(zip(labels, pbest["alignjax"], pbest["PyTorch"]))
    rows.append(("sum of (a)-(c)", sum(pbest["alignjax"]), sum(pbest["PyTorch"])))
    rows.append(("whole step", best["alignjax"], best["PyTorch"]))
    for label, tj, tt in rows:
      print(f"{label:32s}{tj:10.3f}{tt:10.3f}{tt / tj:7.2f}")
  print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
