r"""Offline preference optimisation on the embedded arithmetic language: DPO, cDPO, RPO, IPO, SPPO.

  python -m experiments.lm_offline --config=experiments/configs/lm_offline/arithmetic.py:loss=dpo --workdir=runs/dpo

The reference policy is the embedded tiny Llama (experiments/pretrain_lm.py) pretrained for only
`reference.pretrain_steps` steps, so it still gets many sums wrong. The pairs: for each training
prompt, `data.samples_per_prompt` = 8 samples of the reference, of which the judge's best and
worst form the pair (lm_offline.round_robin_extremes; synthetic_language eq. 3: exact answer 1,
a near miss less, malformed 0), kept when an exact answer meets a wrong one
(`data.min_reward_gap` 0.5). Evaluation: win rate of the policy over the reference on held-out
prompts (one sample each at T = 1; 0.5 means no better).

Measured (2-core CPU, 600-step reference; win rate of one T = 1 sample against one reference
sample on 1024 held-out prompts, 95 % interval about ±0.03; exact answers of the reference
0.107; 16384 training prompts, 1000 steps of 64 pairs, 2-4 min a run):

  command argument / overrides                                   pairs  win rate  exact
  loss=dpo (default: β 1, 8 samples a prompt)                     7666    0.599   0.162
  loss=dpo --config.data.samples_per_prompt=2 (a random pair)     2699    0.501   0.162
  loss=dpo --config.dpo.beta=0.1                                  7666    0.379   0.114
  loss=cdpo (label smoothing 0.1)                                 7666    0.594   0.164
  loss=ipo (τ 0.1)                                                7666    0.566   0.144
  loss=sppo (η 1)                                                 7666    0.537   0.135
  loss=dpo,finetune=lora (rank 8, lr 1e-3)                        7666    0.509   0.125
  loss=rpo (β 0.1, α 5: DPO + NLL of the chosen; 600 steps)       7666    0.651   0.312
  loss=rpo --config.rpo.beta=1e-4 (the NLL term alone: ablation)  7666    0.628   0.303

Why the best and worst of 8 and not a random pair of samples: the reference's sampled answers
are rarely malformed, so two of them seldom include one (1.5 % of the rejected answers of the
random pairs, 7.6 % of the worst-of-8). DPO lowers the likelihood of both answers of a pair and
moves the mass to answers no pair rejects: with random pairs the policy gives more exact answers
(0.107 → 0.162) while its mean reward barely moves (0.391 → 0.400) and it wins no more often
than the reference (0.501); pairing the extremes of 8 samples puts the malformed answers among
the rejected, and the mean reward rises to 0.454 and the win rate to 0.599. With β = 0.1 the
loss keeps asking for log-ratio margins of tens of nats and the policy drifts far from the
reference on answers the pairs never show (0.379); β = 1 is met with margins of a few nats.
RPO's gain over DPO comes mostly from its NLL term, supervised learning on the exact answers
(0.628 alone; the preference term adds 0.023, inside the interval).

Variants through the argument (`--config=...arithmetic.py:loss=ipo,finetune=lora`):
  loss      dpo (default) | rpo | ipo | sppo; cdpo = dpo with dpo.label_smoothing > 0.
  finetune  full (default) | lora.
  smoke     True: a barely trained small reference and two steps (tests).
"""

import ml_collections

from alignjax import configs, finite

LOSSES = ("dpo", "cdpo", "rpo", "ipo", "sppo")


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss="dpo", finetune="full", smoke=False)
  if arg.loss not in LOSSES:
    raise configs.ConfigError(f"loss={arg.loss!r}: valid choices are {LOSSES}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.loss = "dpo" if arg.loss == "cdpo" else arg.loss
  c.num_steps = 1000
  c.batch_size = 64

  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)

  # The reference: an HF LM directory, or "" for the embedded LM pretrained by
  # configs/pretrain_lm/tiny.py (argument pretrain_arg) for `pretrain_steps` steps, cached under
  # cache_dir ("" = $ALIGNJAX_CACHE or ~/.cache/alignjax, one directory per config).
  c.reference = dict(model_dir="", pretrain_arg="", pretrain_steps=600, cache_dir="")
  # The pairs: a JSONL file `preferences` (prompt, chosen, rejected, optional probability
  # `label_key`; tokenised by the reference's tokenizer, held-out `eval_prompts` needed), or,
  # when empty, the judge's best and worst of `samples_per_prompt` reference samples for each
  # of `num_prompts` training equations, kept when their rewards differ by >= min_reward_gap
  # (0.5: an exact answer against a wrong one).
  c.data = dict(
      preferences="",
      eval_prompts="",
      label_key="p_chosen",
      max_length=128,
      max_prompt_length=64,
      on_too_long="error",
      max_operand=99,
      test_fraction=0.1,
      split_seed=0,
      num_prompts=16384,
      samples_per_prompt=8,
      min_reward_gap=0.5,
      chosen="sampled",  # "gold": the correct answer against each wrong sample (SPIN-like)
  )
  c.judge = dict(name="arithmetic", scale=10.0, temperature=0.0)
  c.sampling = dict(max_new_tokens=5, temperature=1.0, top_k=0, top_p=1.0)

  c.dpo = dict(beta=1.0, label_smoothing=0.1 if arg.loss == "cdpo" else 0.0)
  # RPO (dpo eq. 8): DPO plus alpha times the chosen responses' per-token NLL.
  c.rpo = dict(beta=0.1, alpha=5.0)
  if arg.loss == "rpo":
    c.num_steps = 600
  c.ipo = dict(tau=0.1)
  c.sppo = dict(eta=1.0)

  # LoRA (alignjax.models.lora, PEFT's definition) on the named projections of every layer.
  c.finetune = dict(
      mode=arg.finetune,
      lora_rank=8,
      lora_alpha=16.0,
      lora_modules=("q", "k", "v", "o", "gate", "up", "down"),
      lora_init="kaiming",
      rslora=False,
  )
  c.optimizer = dict(
      learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0
  )
  if arg.loss == "rpo":
    c.optimizer.learning_rate = 3e-4
  if arg.finetune == "lora":
    c.optimizer.learning_rate = 1e-3

  c.checkpoint = dict(every=50, keep=2, on_damage="error")
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.eval = dict(every=150 if arg.loss == "rpo" else 250, num_prompts=1024, temperature=1.0)

  if arg.smoke:
    c.num_steps = 2
    c.batch_size = 8
    c.data.update(num_prompts=64, samples_per_prompt=2, min_reward_gap=0.0)
    c.reference.update(pretrain_arg="smoke=True", pretrain_steps=4)
    c.checkpoint.every = 1
    c.eval.update(every=1, num_prompts=16)
  return c
