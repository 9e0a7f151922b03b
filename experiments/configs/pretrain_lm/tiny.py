r"""Pretrain the embedded tiny LM on the synthetic arithmetic language.

  python -m experiments.pretrain_lm --config=experiments/configs/pretrain_lm/tiny.py --workdir=runs/pretrain_lm

A Llama-shaped 2-layer TransformerLM (hidden 64, ~0.1M parameters) learns sentences
"a+b=c" / "a-b=c" with operands 0..99 (alignjax.data.synthetic_language). Expected on a 2-core
CPU (a few minutes): greedy completions of held-out equations (never seen in training) exact
in >= 90% of cases (target `targets.test_accuracy`). The model and its tokenizer are saved in
<workdir>/model in the Hugging Face format (config.json, model.safetensors, tokenizer.json);
results in <workdir>/report.json.

Argument (`--config=...tiny.py:smoke=True`):
  smoke  True: a handful of steps and a small evaluation (smoke tests).
"""

import ml_collections

from alignjax import configs, finite


def get_config(arg=None):
  arg = configs.parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # The language: alignjax.data.synthetic_language.equations arguments.
  c.data = dict(max_operand=99, test_fraction=0.1, split_seed=0)
  # alignjax.models.lm_config.LMConfig fields (vocabulary and token ids come from the language).
  c.model = dict(
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      mlp_dim=192,
      max_position_embeddings=32,
      rope_theta=10000.0,
  )
  # Next-token cross-entropy over whole sentences, AdamW with warm-up + cosine decay.
  # Stop on the first NaN/inf loss or parameter (alignjax.finite).
  c.finite = finite.config(policy="stop", max_consecutive_skips=3)
  c.train = dict(
      steps=4000,
      batch_size=128,
      learning_rate=3e-3,
      warmup_steps=200,
      end_lr_fraction=0.05,
      weight_decay=0.01,
      max_grad_norm=1.0,
      log_every=200,
  )
  # Greedy completion of held-out (and, for reference, training) equations.
  c.eval = dict(num_examples=1000, batch_size=250)
  c.targets = dict(test_accuracy=0.9)
  if arg.smoke:
    c.model.update(
        hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32, num_layers=1
    )
    c.train.update(steps=4, batch_size=16, warmup_steps=1, log_every=2)
    c.eval.update(num_examples=16, batch_size=16)
  return c
