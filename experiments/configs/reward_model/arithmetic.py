r"""A Bradley–Terry reward model of the embedded arithmetic judge, for RLHF with lm_online.

  python -m experiments.reward_model --config=experiments/configs/reward_model/arithmetic.py --workdir=runs/rm
  python -m experiments.lm_online --config=experiments/configs/lm_online/arithmetic.py \
      --config.judge.name=reward_model --config.judge.model_dir=runs/rm/reward_model \
      --config.eval.judge.name=arithmetic --workdir=runs/rlhf

The pairs are two samples of the reference (the embedded tiny LM pretrained for 600 steps) per
equation, labelled by the programmatic judge (synthetic_language eq. 3: the better answer
wins); ties dropped. Held-out pairs come from the held-out equations. Figures measured on a
2-core CPU are in the closing note of the session that added this config.

Argument (`--config=...arithmetic.py:smoke=True`): smoke  a handful of steps (tests).
"""

import ml_collections

from alignjax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 400
  c.batch_size = 64
  c.eval_every = 100
  c.reference = dict(model_dir="", pretrain_arg="", pretrain_steps=600, cache_dir="")
  c.data = dict(
      preferences="",
      eval_preferences="",
      label_key="p_chosen",
      max_length=128,
      max_prompt_length=64,
      max_operand=99,
      test_fraction=0.1,
      split_seed=0,
      num_prompts=8192,
      num_eval_prompts=1024,
  )
  c.judge = dict(name="arithmetic", scale=10.0, temperature=0.0)
  c.sampling = dict(max_new_tokens=5, temperature=1.0, top_k=0, top_p=1.0)
  c.optimizer = dict(
      learning_rate=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0
  )
  if arg.smoke:
    c.steps = 2
    c.batch_size = 8
    c.eval_every = 0
    c.data.update(num_prompts=32, num_eval_prompts=16)
    c.reference.update(pretrain_arg="smoke=True", pretrain_steps=4)
  return c
