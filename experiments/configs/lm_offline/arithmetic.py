r"""Offline preference optimisation on the embedded arithmetic language: DPO, cDPO, RPO, IPO, SPPO.

  python -m experiments.lm_offline --config=experiments/configs/lm_offline/arithmetic.py:loss=dpo --workdir=runs/dpo

The reference policy is the embedded tiny Llama (experiments/pretrain_lm.py) pretrained for only
`reference.pretrain_steps` steps, so it still gets many sums wrong. The pairs are two of its own
samples per training prompt, labelled by the programmatic judge (synthetic_language eq. 3:
exact answer 1, a near miss less, malformed 0; ties dropped). Evaluation: win rate of the
policy over the reference on held-out prompts (one sample each at T = 1; 0.5 means no better).

Measured (2-core CPU, 600-step reference; win rate of one T = 1 sample against one reference
sample on 1024 held-out prompts, standard error ~0.015; exact answers of the reference 0.212):

  loss  settings (4096 prompts: 1208 sampled pairs, 3254 with gold)    win rate  exact
  dpo   β 0.1, lr 1e-4, 150 steps (default)                              0.359   0.104   (512 prompts)
  dpo   data.chosen=gold, 600 steps, lr 3e-4                             0.287   0.096
  dpo   β 0.5, lr 2e-5, num_prompts=16384 (3.9k pairs)                   0.464   0.152   (512)
  ipo   lr 2e-5, num_prompts=16384                                       0.459   0.148   (512)
  rpo   α 5, 600 steps, lr 3e-4 (loss=rpo defaults)                      0.635   0.433
  rpo   the same with β = 1e-4 (the NLL term alone: ablation)            0.624   0.409
  rpo   data.chosen=gold, α 5, 600 steps, lr 3e-4                        0.618   0.405
  rpo   the same with β = 1e-4 (ablation)                                0.611   0.409

Offline DPO and IPO on the reference's own judged samples LOWER the win rate on this task, while
the online methods on the same judge raise it (lm_online/arithmetic.py). The pairs are learned
(train-batch ranking accuracy 0.5 → 0.73) but both completions lose likelihood: after 136 DPO
steps log π/π_ref is −1.3 nats on the chosen and −2.8 on the rejected answers, so mass moves to
answers neither pair contains (the likelihood displacement of offline DPO; the chosen are only
1-2 tokens and share their first digit with the rejected). RPO's NLL term on the chosen answer
(dpo eq. 8) prevents it and raises the win rate to 0.635, but the ablation shows that nearly all
of the gain comes from the NLL term itself (supervised learning on the exact answers among
the reference's samples): the preference term adds ~0.01, within the noise. This config
reproduces both; `experiments/lm_offline.py` is the loop for real preference data.

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
  c.num_steps = 150
  c.batch_size = 64

  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)

  # The reference: an HF LM directory, or "" for the embedded LM pretrained by
  # configs/pretrain_lm/tiny.py (argument pretrain_arg) for `pretrain_steps` steps, cached under
  # cache_dir ("" = $ALIGNJAX_CACHE or ~/.cache/alignjax, one directory per config).
  c.reference = dict(model_dir="", pretrain_arg="", pretrain_steps=600, cache_dir="")
  # The pairs: a JSONL file `preferences` (prompt, chosen, rejected, optional probability
  # `label_key`; tokenised by the reference's tokenizer, held-out `eval_prompts` needed), or,
  # when empty, two reference samples for each of `num_prompts` training equations, kept when
  # their rewards differ by >= min_reward_gap (0.5: an exact answer against a wrong one).
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
      num_prompts=4096,
      min_reward_gap=0.5,
      chosen="sampled",  # "gold": the correct answer against each wrong sample (SPIN-like)
  )
  c.judge = dict(name="arithmetic", scale=10.0, temperature=0.0)
  c.sampling = dict(max_new_tokens=5, temperature=1.0, top_k=0, top_p=1.0)

  c.dpo = dict(beta=0.1, label_smoothing=0.1 if arg.loss == "cdpo" else 0.0)
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
  c.eval = dict(every=150 if arg.loss == "rpo" else 50, num_prompts=1024, temperature=1.0)

  if arg.smoke:
    c.num_steps = 2
    c.batch_size = 8
    c.data.update(num_prompts=64, min_reward_gap=0.0)
    c.reference.update(pretrain_arg="smoke=True", pretrain_steps=4)
    c.checkpoint.every = 1
    c.eval.update(every=1, num_prompts=16)
  return c
