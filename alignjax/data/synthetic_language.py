r"""An embedded synthetic language: integer arithmetic sentences, and its character tokenizer.

A sentence is one equation over operands a, b in 0 .. max_operand:

    "a+b=c"  with c = a + b,        "a-b=c"  with c = a - b (only a >= b, so c >= 0)     (eq. 1)

written in decimal without leading zeros. The prompt is everything up to and including "=",
the completion is the decimal c followed by the end-of-sequence token. Each (a, op, b)
belongs to the held-out split iff

    (a * (max_operand + 1) + b) * 2 + [op == "-"]  is selected by a seeded permutation    (eq. 2)

(a fixed fraction `test_fraction` of all equations), so train and test never share an equation.

The tokenizer is character level: ids 0, 1, 2 are <pad>, <bos>, <eos>, then "0".."9", "+",
"-", "=" (16 ids). `save_tokenizer(directory)` writes a Hugging Face `tokenizers`
tokenizer.json (a WordLevel model over single characters, <bos> prepended on encode, characters
joined on decode) and a tokenizer_config.json, which `alignjax.models.convert.load_tokenizer`
reads with transformers. `encode` / `decode` are the same mapping in plain Python (no
dependency) for the training and evaluation loops.

A programmatic judge of completions (the embedded task of the LM alignment scripts): for the
prompt "a op b=" with true answer c and a completion ĉ (the text before <eos>),

    r(x, ĉ) = 1                       if ĉ == str(c)
              ½ · exp(−|ĉ − c| / s)    if ĉ is a decimal number without leading zeros
              0                       otherwise (empty, malformed, or not a number)       (eq. 3)

with s = `arithmetic_reward`'s `scale` (default 10): correct beats close beats far beats
malformed, a transitive order that a Bradley–Terry judge over r expresses exactly.

An intransitive judge: three rater populations, each ranking completions by one property,

    s_1 = r (eq. 3, accuracy),   s_2 = last digit of ĉ,   s_3 = −ĉ (smaller numbers)      (eq. 4)
    (a malformed completion scores −1, −1, −∞: last for every rater)
    P(a ≻ b) = (1/3) Σ_i ([s_i(a) > s_i(b)] + ½ [s_i(a) = s_i(b)])                        (eq. 5)

(`rater_preference`). Majorities of three rankings can cycle (Condorcet's paradox): e.g. for
"5+5=" the completions "10" (correct), "12" (near, last digit 2) and "1" (far, small, last
digit 1) give P(10 ≻ 12) = P(12 ≻ 1) = P(1 ≻ 10) = ⅔, so no reward model over completions can express
the judge, while its Nash equilibrium (the target of Nash-MD and SPO) exists.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)
CHARS = "0123456789+-="
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
PAD_ID, BOS_ID, EOS_ID = VOCAB[PAD], VOCAB[BOS], VOCAB[EOS]
VOCAB_SIZE = len(VOCAB)
OPS = ("+", "-")
SPLITS = ("train", "test")

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "VOCAB",
    "VOCAB_SIZE",
    "arithmetic_reward",
    "rater_preference",
    "rater_scores",
    "decode",
    "encode",
    "equations",
    "max_sentence_length",
    "save_tokenizer",
    "sentences",
    "true_answer",
]


def equations(
    split: str, *, max_operand: int = 99, test_fraction: float = 0.1, seed: int = 0
) -> list[tuple[str, str]]:
  """All (prompt, answer) pairs of a split (eqs. 1-2), e.g. ("12+7=", "19")."""
  if split not in SPLITS:
    raise ValueError(f"equations: split={split!r}; valid choices are {SPLITS}")
  if max_operand < 1:
    raise ValueError(f"equations: max_operand={max_operand} must be >= 1")
  if not 0 < test_fraction < 1:
    raise ValueError(f"equations: test_fraction={test_fraction} must be in (0, 1)")
  n = max_operand + 1
  codes = np.arange(n * n * 2)
  held = np.zeros(codes.size, bool)
  perm = np.random.default_rng(seed).permutation(codes.size)
  held[perm[: int(round(test_fraction * codes.size))]] = True  # eq. 2
  out = []
  for code in codes[held if split == "test" else ~held]:
    pair, minus = divmod(int(code), 2)
    a, b = divmod(pair, n)
    if minus and a < b:
      continue
    c = a - b if minus else a + b  # eq. 1
    out.append((f"{a}{OPS[minus]}{b}=", str(c)))
  return out


def max_sentence_length(max_operand: int = 99) -> int:
  """Tokens in the longest sentence: <bos> a op b = c <eos>."""
  digits = len(str(max_operand))
  return 1 + 2 * digits + 2 + len(str(2 * max_operand)) + 1


def encode(text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
  """Character ids of `text` (characters outside the language raise ValueError)."""
  bad = sorted(set(text) - set(CHARS))
  if bad:
    raise ValueError(f"encode: characters {bad} are not in the language; valid: {CHARS!r}")
  return [BOS_ID] * bos + [VOCAB[ch] for ch in text] + [EOS_ID] * eos


def decode(ids: Sequence[int]) -> str:
  """Text of ids up to the first <eos>, special tokens dropped."""
  inverse = {i: t for t, i in VOCAB.items()}
  out = []
  for i in ids:
    i = int(i)
    if i == EOS_ID:
      break
    if i in inverse and inverse[i] not in SPECIALS:
      out.append(inverse[i])
  return "".join(out)


def true_answer(prompt: str) -> int:
  """c of a prompt "a op b=" (eq. 1); a prompt not of that form raises ValueError."""
  body = prompt[:-1] if prompt.endswith("=") else None
  for op in OPS:
    if body is not None and op in body:
      a, _, b = body.partition(op)
      if a.isdigit() and b.isdigit():
        return int(a) + int(b) if op == "+" else int(a) - int(b)
  raise ValueError(f"true_answer: {prompt!r} is not a prompt 'a+b=' or 'a-b='")


def arithmetic_reward(prompt: str, completion: str, *, scale: float = 10.0) -> float:
  """Eq. 3: 1 for the exact answer, ½ exp(−|ĉ − c| / scale) for another number, else 0."""
  c = true_answer(prompt)
  if completion == str(c):
    return 1.0
  if not completion.isdigit() or (len(completion) > 1 and completion[0] == "0"):
    return 0.0
  return 0.5 * float(np.exp(-abs(int(completion) - c) / scale))


def rater_scores(prompt: str, completion: str) -> tuple[float, float, float]:
  """(s_1, s_2, s_3) of eq. 4: accuracy (eq. 3), the last digit, smallness."""
  r = arithmetic_reward(prompt, completion)
  if r == 0.0:  # malformed (eq. 3): last for every rater
    return 0.0, -1.0, -np.inf
  return r, float(completion[-1]), -float(completion)


def rater_preference(prompt: str, a: str, b: str) -> float:
  """Eq. 5: the fraction of the three rater populations preferring a to b (ties count ½)."""
  sa, sb = rater_scores(prompt, a), rater_scores(prompt, b)
  return sum(float(x > y) + 0.5 * float(x == y) for x, y in zip(sa, sb)) / 3.0


def sentences(pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
  """Token ids of full sentences <bos> prompt answer <eos>."""
  return [encode(p + a, eos=True) for p, a in pairs]


def save_tokenizer(directory: str) -> list[str]:
  """tokenizer.json (HF `tokenizers`) + tokenizer_config.json into `directory`."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel

  tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=PAD))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
  )
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIALS))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": BOS,
      "eos_token": EOS,
      "pad_token": PAD,
      "unk_token": PAD,
      "padding_side": "left",
      "model_max_length": 1024,
      "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return ["tokenizer.json", "tokenizer_config.json"]
