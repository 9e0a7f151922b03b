r"""GRPO (or RLOO, online IPO) on a ~1B-parameter Llama-shaped model, sharded data × fsdp.

  python -m experiments.lm_online --config=experiments/configs/lm_online/llama_1b.py \
      --config.reference.model_dir=/path/to/Llama-3.2-1B-Instruct \
      --config.data.prompts=/path/to/prompts.jsonl --config.data.eval_prompts=/path/to/eval.jsonl \
      --config.judge.model_dir=/path/to/reward_model --workdir=runs/grpo_1b

The model is the user's Hugging Face checkpoint (`reference.model_dir`); `model_shape` is the
Llama-3.2-1B architecture (1.24B parameters), which the tests use to lower one training step
of this config with `jax.eval_shape` shapes on a data × fsdp mesh of 8 fake devices (no weights).
Parameters and Adam moments are sharded over fsdp (and tensor) by the LM sharding rules; the
batch over data × fsdp. The vocabulary (128k) is scored in chunks, never as [B, L, V] logits.

Argument (`--config=...llama_1b.py:algorithm=rloo,finetune=lora`): algorithm, finetune as in
arithmetic.py.
"""

from alignjax import configs
from experiments.configs.lm_online import arithmetic

LLAMA_3_2_1B = dict(
    family="llama",
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    tie_embeddings=True,
    rope_theta=500000.0,
    rope_type="llama3",
    rope_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_positions=8192,
    max_position_embeddings=131072,
    norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
    dtype="bfloat16",
)


def get_config(arg=None):
  arg = configs.parse_arg(arg, algorithm="grpo", finetune="full")
  c = arithmetic.get_config(f"algorithm={arg.algorithm},finetune={arg.finetune}")
  c.model_shape = LLAMA_3_2_1B
  c.mesh = dict(data=-1, fsdp=8, tensor=1)
  c.reference.update(model_dir="", pretrain_steps=1)
  c.num_iterations = 200
  c.prompts_per_iteration = 64
  c.num_samples = 2 if arg.algorithm == "online_ipo" else 8
  c.num_minibatches = 4
  c.num_epochs = 2 if arg.algorithm == "grpo" else 1
  c.sampling = dict(max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0)
  c.scoring = dict(seq_chunk=256, vocab_chunk=16384)
  c.data.update(max_prompt_length=512)
  c.judge = dict(name="reward_model", model_dir="", scale=1.0, temperature=1.0)
  c.optimizer.update(learning_rate=1e-6 if arg.finetune == "full" else 1e-5)
  c.eval.update(every=25, num_prompts=256)
  c.checkpoint.update(every=25, keep=2)
  return c
