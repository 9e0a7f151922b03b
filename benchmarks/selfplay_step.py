r"""One Nash-MD iteration: alignjax (as `experiments.lm_online` runs it) vs TRL's NashMDTrainer.

  python -m benchmarks.selfplay_step              # Llama 256 x 4 layers, vocab 8192, batch 8
  python -m benchmarks.selfplay_step --smoke      # tiny sizes, one repeat (a quick test)
  python -m benchmarks.selfplay_step --skip_trl   # alignjax only (no trl needed)

TRL is not an alignjax dependency; the `benchmark` extra pins the release this benchmark
targets, `pip install -e '.[test,benchmark]'` (trl 1.12.0 keeps Nash-MD in
`trl.experimental.nash_md`; it runs with the test extra's transformers 5 / torch / datasets and
needs nothing else). A trl kept outside the environment works too: `--trl_path` (default
$TRL_PATH, else /tmp/trl112) is put first on sys.path for the TRL part, e.g. after
  pip install --no-deps --target /tmp/trl112 trl==1.12.0

One iteration, the same work in both frameworks, batch B prompts of P tokens (BOS + P − 1 random
tokens, no padding), N new tokens at temperature 1 (no top-k / top-p), EOS id 2 (a random model
rarely emits it, so rows run to N):
  1. y ~ π_θ: B responses of the policy (KV-cached decoding in both);
  2. y' ~ π^β ∝ π_θ^(1−β) π_ref^β token by token: B responses of the geometric mixture
     (alignjax: `rollout_lib.mixture_rollout`, one while-loop carrying both models' KV caches;
     TRL: `GeometricMixtureWrapper.generate`, which turns the KV cache off, so every step re-runs
     both models over the whole prefix);
  3. the judge: P(y ≻ y') = σ(r(y) − r(y')) with r = the number of response tokens with id ≥ V/2
     (a cheap programmatic rule; TRL 1.12's NashMDTrainer takes no pairwise judge, only a reward
     model read through `trl.experimental.utils.get_reward`, so the rule is a duck-typed reward
     "model" whose backbone returns the running count; its σ(r − r') is the same verdict);
  4. log-probs of y under π_ref (alignjax also scores π_old, as `lm_online` does);
  5. one AdamW step (lr 1e-5, weight decay 0, global-norm clipping at 1) on the Nash-MD loss with
     KL coefficient τ (alignjax: `nash_md.nash_md_loss`, causal estimator, jitted, state donated;
     TRL: its REINFORCE loss, `accelerator.backward`, the Trainer's clip / step / zero_grad).

Settings: β = mixture coefficient (TRL `mixture_coef`), τ = KL coefficient (TRL `beta`), float32
(TRL `bf16=False`), TRL `gradient_checkpointing=False` (its config defaults to True, which also
turns off the policy's KV cache in generation: the faster setting for TRL is used), constant
learning rate. Both models start from identical weights: a random transformers Llama saved to a
temporary directory, loaded into alignjax with `convert.load_hf_lm` and into TRL with
`from_pretrained` (TRL's reference is its own frozen copy).

Timing: the process is pinned to `--threads` cores before either framework starts (torch gets
set_num_threads; XLA:CPU sizes its pool from the affinity mask). alignjax is warmed up (compiled)
before TRL's `trainer.train()` starts; TRL's first step is its warm-up; after every TRL step a
`TrainerCallback.on_step_end` runs one alignjax iteration, so the repeats are interleaved
(TRL, alignjax, TRL, ...) and load from other processes hits both alike. A TRL step is
on_step_begin → on_step_end (tokenising, both generations, reward, log-probs, backward, clip,
AdamW, zero_grad); an alignjax iteration ends with `block_until_ready` on the new state. The best
of `--repeats` is kept (the median printed too). Sub-phases: alignjax's phases are timed with a
`block_until_ready` after each; TRL's generation time wraps `_generate_completions`.

  iterations/s = 1 / t_iteration;   decode tokens/s = B N / t_rollout   (prefill included)  (1)

and the mixture's cost is t_mixture / t_policy (two models per step: < 2 is the target).

Measured on the 2-core AMD EPYC (Zen 3) this project is developed on, while a long background
run shared the two cores (load average ~2.4: absolute figures are noisy, the ratios come from
interleaved repeats in one process), default sizes (4.7M parameters: hidden 256, 4 layers,
vocab 8192), batch 8, prompt 16, 128 new tokens, β = 0.5, τ = 0.1, --threads=2:
  alignjax 0.496 it/s (2.02 s: policy sample 0.47, mixture sample 0.84, judge + scores 0.21,
  update 0.46), TRL 0.260 it/s (3.84 s, of which generations 3.36 s, the no-cache mixture
  2.14 s): x1.90 (median x1.94), generations x2.56 (policy x2.58, mixture x2.54); mixture /
  single-model decode time x1.79 (2176 against 1217 tok/s), load average ~3.5.
An earlier run under load ~7 gave x22 (TRL 72-140 s a step): torch's thread pool degrades far
more than XLA's when the cores are oversubscribed, so compare only runs at similar load. At
this size the update is compute-bound in both (~110-130 GFLOP/s float32) and alignjax's decode
bandwidth-bound, so the ratio is set by the generations; the 3x target is not reached here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

SIZES = {
    "default": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        vocab_size=8192,
    ),
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
}
PAD, BOS, EOS = 0, 1, 2
LEARNING_RATE, MAX_GRAD_NORM = 1e-5, 1.0


def pin_threads(threads: int | None) -> int:
  """Pins this process to its first `threads` allowed cores (all when None); returns the count.
  Must run before jax or torch start their thread pools."""
  allowed = sorted(os.sched_getaffinity(0))
  threads = len(allowed) if threads is None else threads
  if not 1 <= threads <= len(allowed):
    raise ValueError(f"--threads={threads}: must lie in [1, {len(allowed)}] (cores allowed)")
  os.sched_setaffinity(0, allowed[:threads])
  return threads


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny model and lengths, 1 repeat")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=None, help="default 16 (smoke 8)")
  parser.add_argument("--new_tokens", type=int, default=None, help="default 128 (smoke 8)")
  parser.add_argument("--repeats", type=int, default=None, help="default 3 (smoke 1)")
  parser.add_argument("--beta", type=float, default=0.5, help="mixture coefficient β")
  parser.add_argument("--tau", type=float, default=0.1, help="KL coefficient τ")
  parser.add_argument("--threads", type=int, default=None, help="cores (default: all allowed)")
  parser.add_argument("--skip_trl", action="store_true", help="alignjax only")
  parser.add_argument(
      "--trl_path",
      default=os.environ.get("TRL_PATH", "/tmp/trl112"),
      help="directory holding trl 1.12.0 (pip install --target), put on sys.path for TRL",
  )
  args = parser.parse_args(argv)
  args.size = "smoke" if args.smoke else "default"
  args.prompt_len = args.prompt_len or (8 if args.smoke else 16)
  args.new_tokens = args.new_tokens or (8 if args.smoke else 128)
  args.repeats = args.repeats or (1 if args.smoke else 3)
  return args


# ============================================================================ alignjax


def make_alignjax(args, model_dir, prompts):
  """(warm-up-free) alignjax iteration `step() -> phase seconds` over the model in model_dir."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from alignjax import judges, training
  from alignjax.algorithms import nash_md
  from alignjax.lm import rollout as rollout_lib
  from alignjax.lm import sampling
  from alignjax.models import convert
  # pylint: enable=import-outside-toplevel

  model, _ = convert.load_hf_lm(model_dir)
  graphdef, ref_params = nnx.split(model)
  vocab = model.config.vocab_size
  b, p = prompts.shape
  cfg = sampling.SamplingConfig(
      max_new_tokens=args.new_tokens, temperature=1.0, eos_ids=(EOS,), pad_id=PAD
  )
  tokens, valid = prompts.astype(np.int32), np.ones(prompts.shape, bool)
  optimizer = training.make_optimizer(
      training.OptimizerConfig(
          learning_rate=LEARNING_RATE, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM
      )
  )
  state = training.TrainState.create(
      jax.tree.map(jnp.copy, ref_params), optimizer, jax.random.key(0)
  )

  class TokenCountJudge(judges.Judge):
    """P(a ≻ b) = σ(r(a) − r(b)), r = valid response tokens with id ≥ V/2 (module docstring)."""

    def win_probability(self, a, b):
      count = lambda c: np.sum(np.asarray(c.valid) & (np.asarray(c.tokens) >= vocab // 2), 1)
      return 1.0 / (1.0 + np.exp(-(count(a) - count(b)).astype(np.float32)))

  judge = TokenCountJudge()
  completions = lambda r: judges.Completions(r.prompt_tokens, r.prompt_valid, r.tokens, r.valid)
  score = jax.jit(lambda params, r: rollout_lib.response_log_probs(graphdef, params, r))

  def update(state, batch):
    def loss_fn(params):
      logp = rollout_lib.response_log_probs(graphdef, params, batch["rollout"])
      return nash_md.nash_md_loss(
          logp, batch["ref_logp"], batch["mask"], batch["win_prob"], tau=args.tau
      )

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, optimizer), {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        **aux,
    }

  update_fn = jax.jit(update, donate_argnums=0)
  holder = {"state": state, "it": 0, "lengths": []}
  sample_kwargs = dict(max_prompt_len=p, min_bucket=p)

  def step() -> dict:
    times = {}
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(1), holder["it"])
    policy = holder["state"].params
    r = jax.block_until_ready(
        rollout_lib.rollout(graphdef, policy, tokens, valid, key, cfg, **sample_kwargs)
    )
    t1 = time.perf_counter()
    opponent = jax.block_until_ready(
        rollout_lib.mixture_rollout(
            ((graphdef, policy), (graphdef, ref_params)),
            (1.0 - args.beta, args.beta),
            tokens,
            valid,
            jax.random.fold_in(key, 1),
            cfg,
            **sample_kwargs,
        )
    )
    t2 = time.perf_counter()
    win = judge.win_probability(completions(r), completions(opponent))
    old_logp = score(policy, r)  # as lm_online does (nash_md's loss does not read it)
    ref_logp = jax.block_until_ready(score(ref_params, r))
    t3 = time.perf_counter()
    batch = {
        "rollout": r,
        "old_logp": old_logp,
        "ref_logp": ref_logp,
        "mask": r.valid,
        "win_prob": jnp.asarray(win),
    }
    holder["state"], out = update_fn(holder["state"], batch)
    jax.block_until_ready((holder["state"], out))
    t4 = time.perf_counter()
    holder["it"] += 1
    holder["lengths"].append(
        (float(np.asarray(r.valid).sum(1).mean()), float(np.asarray(opponent.valid).sum(1).mean()))
    )
    holder["loss"] = float(out["loss"])
    times.update(
        iteration=t4 - t0,
        policy_sample=t1 - t0,
        mixture_sample=t2 - t1,
        judge_score=t3 - t2,
        update=t4 - t3,
    )
    return times

  info = dict(
      jax=jax.__version__,
      platform=jax.devices()[0].platform,
      params=sum(x.size for x in jax.tree.leaves(ref_params)),
  )
  return step, holder, info


# ============================================================================ TRL


def run_trl(args, model_dir, prompts, on_step_end):
  """Runs NashMDTrainer for 1 + repeats steps, calling on_step_end() after each; returns
  (per-step seconds, per-step generation seconds, versions)."""
  sys.path.insert(0, args.trl_path)
  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  # pylint: disable=import-outside-toplevel
  import datasets
  import tokenizers
  import torch
  import transformers
  import trl
  from trl.experimental.nash_md import NashMDConfig, NashMDTrainer
  from trl.experimental.nash_md import nash_md_trainer
  # pylint: enable=import-outside-toplevel

  if trl.__version__ != "1.12.0":
    print(f"note: trl {trl.__version__} found at {trl.__file__}, this benchmark targets 1.12.0")
  vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
  words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
  words.update({f"t{i}": i for i in range(len(words), vocab)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
  )
  # TRL prepends BOS itself (`tokenize_row`), so the ids are exactly `prompts`.
  texts = [" ".join(f"t{i}" for i in row[1:]) for row in prompts]
  check = [[BOS] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  if check != prompts.tolist():
    raise AssertionError("the word-level tokenizer does not reproduce the prompt ids")
  steps = 1 + args.repeats
  dataset = datasets.Dataset.from_dict({"prompt": texts * steps})

  class Counter(torch.nn.Module):
    """The reward backbone: hidden state [B, T, 1] = running count of ids ≥ V/2."""

    def forward(self, input_ids, attention_mask, **kwargs):
      del kwargs
      hit = ((input_ids >= vocab // 2) & attention_mask.bool()).float()
      return transformers.utils.ModelOutput(hidden_states=(torch.cumsum(hit, 1)[..., None],))

  class TokenCountReward(torch.nn.Module):
    """r(x, y) read by `get_reward` at the last response token; σ(r − r') is the judge."""

    base_model_prefix = "backbone"

    def __init__(self):
      super().__init__()
      self.backbone = Counter()
      self.score = torch.nn.Identity()
      self.config = transformers.PretrainedConfig(name_or_path="token-count-judge")

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  out_dir = tempfile.mkdtemp(prefix="selfplay_trl_")
  config = NashMDConfig(
      output_dir=out_dir,
      report_to="none",
      use_cpu=True,
      bf16=False,
      gradient_checkpointing=False,
      per_device_train_batch_size=prompts.shape[0],
      gradient_accumulation_steps=1,
      max_steps=steps,
      max_new_tokens=args.new_tokens,
      max_length=args.prompt_len + args.new_tokens + 1,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      beta=args.tau,
      mixture_coef=args.beta,
      learning_rate=LEARNING_RATE,
      weight_decay=0.0,
      max_grad_norm=MAX_GRAD_NORM,
      lr_scheduler_type="constant",
      logging_steps=10**6,
      save_strategy="no",
      disable_tqdm=True,
      dataloader_num_workers=0,
      seed=0,
  )
  times, gen_times, mix_times, marks = [], [], [], {}

  class Interleave(transformers.TrainerCallback):

    def on_step_begin(self, args, state, control, **kwargs):
      marks["t0"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      times.append(time.perf_counter() - marks["t0"])
      jax_seconds = on_step_end()
      print(
          f"step {len(times)}: TRL {times[-1]:.2f} s, alignjax {jax_seconds:.3f} s, load "
          f"average {os.getloadavg()[0]:.2f}",
          flush=True,
      )

  trainer = NashMDTrainer(
      model=model,
      reward_funcs=TokenCountReward(),
      args=config,
      train_dataset=dataset,
      processing_class=tokenizer,
      callbacks=[Interleave()],
  )
  generate = trainer._generate_completions  # pylint: disable=protected-access

  def timed_generate(*a, **k):
    t0 = time.perf_counter()
    out = generate(*a, **k)
    gen_times.append(time.perf_counter() - t0)
    return out

  wrapper = nash_md_trainer.GeometricMixtureWrapper
  mixture_generate = wrapper.generate

  def timed_mixture_generate(self, *a, **k):
    t0 = time.perf_counter()
    out = mixture_generate(self, *a, **k)
    mix_times.append(time.perf_counter() - t0)
    return out

  trainer._generate_completions = timed_generate  # pylint: disable=protected-access
  wrapper.generate = timed_mixture_generate
  try:
    trainer.train()
  finally:
    wrapper.generate = mixture_generate
  versions = dict(
      trl=trl.__version__,
      torch=torch.__version__,
      transformers=transformers.__version__,
      torch_threads=torch.get_num_threads(),
  )
  return times, gen_times, mix_times, versions


# ============================================================================ main


def main(argv=None):
  args = parse_args(argv)
  threads = pin_threads(args.threads)
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import torch
  import transformers
  # pylint: enable=import-outside-toplevel

  torch.manual_seed(0)
  torch.set_num_threads(threads)
  b, p, n = args.batch, args.prompt_len, args.new_tokens
  hf_config = transformers.LlamaConfig(
      **SIZES[args.size],
      max_position_embeddings=p + n + 16,
      bos_token_id=BOS,
      eos_token_id=EOS,
      pad_token_id=PAD,
      tie_word_embeddings=False,
  )
  vocab = hf_config.vocab_size
  prompts = np.random.default_rng(0).integers(3, vocab, size=(b, p))
  prompts[:, 0] = BOS
  with tempfile.TemporaryDirectory() as model_dir:
    transformers.LlamaForCausalLM(hf_config).save_pretrained(model_dir)
    jax_step, holder, info = make_alignjax(args, model_dir, prompts)
    load = os.getloadavg()
    print(
        f"Llama {args.size}: {info['params'] / 1e6:.2f}M parameters ({SIZES[args.size]}), "
        f"float32, batch {b}, prompt {p}, {n} new tokens, T=1, β={args.beta}, τ={args.tau}; "
        f"{threads} thread(s) (cores {sorted(os.sched_getaffinity(0))}); jax {info['jax']} "
        f"{info['platform']}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    t0 = time.perf_counter()
    jax_step()  # warm-up: compilation
    print(f"alignjax warm-up (compilation) {time.perf_counter() - t0:.1f} s", flush=True)
    jax_times = []
    if args.skip_trl:
      jax_times = [jax_step() for _ in range(args.repeats)]
      trl_times = None
    else:
      # TRL's first step is its warm-up; alignjax's interleaved iteration after it is kept out.
      def record() -> float:
        jax_times.append(jax_step())
        return jax_times[-1]["iteration"]

      trl_times, trl_gen, trl_mix, versions = run_trl(args, model_dir, prompts, record)
      jax_times, trl_times = jax_times[1:], trl_times[1:]
      trl_gen, trl_mix = trl_gen[1:], trl_mix[1:]

  load = os.getloadavg()
  best = lambda xs: min(xs)
  phases = ("policy_sample", "mixture_sample", "judge_score", "update")
  jax_it = [t["iteration"] for t in jax_times]
  print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 shared cores: noisy)")
  print(
      f"alignjax: {1 / best(jax_it):.3f} iterations/s (best {best(jax_it):.3f} s, median "
      f"{statistics.median(jax_it):.3f} s of {len(jax_it)}); phases (best, s): "
      + ", ".join(f"{k} {best([t[k] for t in jax_times]):.3f}" for k in phases)
  )
  t_pol = best([t["policy_sample"] for t in jax_times])
  t_mix = best([t["mixture_sample"] for t in jax_times])
  lengths = np.mean(holder["lengths"], axis=0)
  print(
      f"alignjax decode (prefill included, eq. 1): policy {b * n / t_pol:.1f} tok/s, mixture "
      f"of 2 models {b * n / t_mix:.1f} tok/s; mixture / single time x{t_mix / t_pol:.2f} "
      f"(target < 2); mean lengths policy {lengths[0]:.1f}, mixture {lengths[1]:.1f}"
  )
  if trl_times is not None:
    print(
        f"TRL NashMDTrainer (trl {versions['trl']}, torch {versions['torch']} x"
        f"{versions['torch_threads']}, transformers {versions['transformers']}): "
        f"{1 / best(trl_times):.3f} iterations/s (best {best(trl_times):.3f} s, median "
        f"{statistics.median(trl_times):.3f} s of {len(trl_times)}); its two generations "
        f"(policy + mixture) best {best(trl_gen):.3f} s, of which the mixture (no KV cache) "
        f"{best(trl_mix):.3f} s"
    )
    print(
        f"alignjax / TRL: iteration x{best(trl_times) / best(jax_it):.2f} faster (median "
        f"x{statistics.median(trl_times) / statistics.median(jax_it):.2f}); generations "
        f"x{best(trl_gen) / (t_pol + t_mix):.2f} (policy x"
        f"{(best(trl_gen) - best(trl_mix)) / t_pol:.2f}, mixture x{best(trl_mix) / t_mix:.2f})"
    )


if __name__ == "__main__":
  with contextlib.suppress(KeyboardInterrupt):
    main()
