"""Tests of alignjax.data.synthetic_language and the tiny-LM pretraining script."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignjax.data import synthetic_language as lang
from alignjax.models import convert
from alignjax.models.lm import forward
from experiments import pretrain_lm
from experiments.configs.pretrain_lm import tiny


def test_equations_are_correct_and_splits_disjoint():
  train = lang.equations("train", max_operand=20)
  test = lang.equations("test", max_operand=20)
  assert not set(train) & set(test)
  # Every (a, op, b) with a valid result appears exactly once: 21*21 sums + 231 differences.
  assert len(train) + len(test) == 21 * 21 + 21 * 22 // 2
  assert 0.05 < len(test) / (len(train) + len(test)) < 0.15
  for prompt, answer in train + test:
    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert int(answer) >= 0 and all(str(int(x)) == x for x in (a, b, answer))
  assert lang.max_sentence_length(99) == len(lang.encode("99+99=198", eos=True))
  with pytest.raises(ValueError, match="valid choices"):
    lang.equations("dev")
  with pytest.raises(ValueError, match="not in the language"):
    lang.encode("1*2=2")


def test_tokenizer_files_round_trip(tmp_path):
  lang.save_tokenizer(str(tmp_path))
  tok = convert.load_tokenizer(str(tmp_path))
  for text in ("12+7=19", "0-0=0", "99+99=198"):
    ids = tok.encode(text)
    assert ids == lang.encode(text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert lang.decode(ids + [lang.EOS_ID, 5]) == text
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
      lang.BOS_ID,
      lang.EOS_ID,
      lang.PAD_ID,
  )
  assert tok.vocab_size == lang.VOCAB_SIZE


def test_pretrain_smoke_saves_loadable_model(tmp_path):
  config = tiny.get_config("smoke=True")
  report = pretrain_lm.pretrain(config, str(tmp_path))
  assert np.isfinite(report["final_loss"])
  with open(tmp_path / "report.json") as f:
    assert json.load(f)["num_test_equations"] == report["num_test_equations"]
  model, cfg = convert.load_hf_lm(str(tmp_path / "model"))
  assert cfg.vocab_size == lang.VOCAB_SIZE and cfg.eos_token_ids == (lang.EOS_ID,)

  # The reported accuracy and completions are those of the saved model, recomputed by a plain
  # greedy loop over full forward passes (no cache, no padding on the left) on the test
  # equations the script draws (rng seeded by config.seed); four steps leave the smoke model
  # far from answering, so no accuracy margin is asked.
  dc = config.data
  split = dict(max_operand=dc.max_operand, test_fraction=dc.test_fraction, seed=dc.split_seed)
  test_pairs = lang.equations("test", **split)
  order = np.random.default_rng(config.seed).permutation(len(test_pairs))
  picked = [test_pairs[i] for i in order[: config.eval.num_examples]]
  graphdef, params = nnx.split(model)
  fwd = jax.jit(forward, static_argnums=0)
  width = lang.max_sentence_length(dc.max_operand) + 1

  def greedy(prompt):
    ids = lang.encode(prompt)
    for _ in range(len(str(2 * dc.max_operand)) + 1):
      padded = jnp.asarray([ids + [lang.PAD_ID] * (width - len(ids))], jnp.int32)
      ids.append(int(np.argmax(np.asarray(fwd(graphdef, params, padded)[0][0, len(ids) - 1]))))
      if ids[-1] == lang.EOS_ID:
        break
    return lang.decode(ids[len(lang.encode(prompt)) :])

  completions = [greedy(p) for p, _ in picked]
  assert [(e["prompt"], e["answer"], e["completion"]) for e in report["examples"]] == [
      (p, a, c) for (p, a), c in zip(picked[:10], completions[:10])
  ]
  assert report["test_accuracy"] == np.mean([c == a for (_, a), c in zip(picked, completions)])
  tok = convert.load_tokenizer(str(tmp_path / "model"))
  assert tok.decode(tok.encode("3+4=7"), skip_special_tokens=True) == "3+4=7"


def test_loss_is_mean_token_nll():
  config = tiny.get_config("smoke=True")
  model = pretrain_lm.TransformerLM(pretrain_lm.lm_config(config), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens, valid = convert.pad_left(
      lang.sentences([("1+2=", "3"), ("10-3=", "7")]), max_length=16, pad_id=lang.PAD_ID
  )
  loss = pretrain_lm.lm_loss(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid))
  fwd = jax.jit(forward, static_argnums=0)
  nll = []
  for row, v in zip(tokens, valid):
    seq = row[v]
    padded = jnp.asarray([list(seq) + [0] * (16 - len(seq))], jnp.int32)  # causal: prefix exact
    z = np.asarray(fwd(graphdef, params, padded)[0][0], np.float64)[: len(seq)]
    lp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    nll += [-lp[t - 1, seq[t]] for t in range(1, len(seq))]
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


def test_validate_names_the_key():
  config = tiny.get_config("smoke=True")
  config.model.max_position_embeddings = 8
  with pytest.raises(ValueError, match="config.model.max_position_embeddings=8"):
    pretrain_lm.validate(config)


def test_arithmetic_reward_is_eq_3():
  assert lang.true_answer("12+7=") == 19 and lang.true_answer("40-2=") == 38
  assert lang.arithmetic_reward("12+7=", "19") == 1.0
  assert lang.arithmetic_reward("12+7=", "21") == pytest.approx(0.5 * np.exp(-0.2))
  assert lang.arithmetic_reward("12+7=", "21", scale=1.0) == pytest.approx(0.5 * np.exp(-2.0))
  for malformed in ("", "019", "1+9", "-3"):
    assert lang.arithmetic_reward("12+7=", malformed) == 0.0
  with pytest.raises(ValueError, match="is not a prompt"):
    lang.true_answer("12*7=")


def test_rater_preference_is_eq_5_and_cycles():
  assert lang.rater_scores("5+5=", "10") == (1.0, 0.0, -10.0)
  assert lang.rater_scores("5+5=", "x1")[2] == -np.inf
  p = lambda a, b: lang.rater_preference("5+5=", a, b)
  assert p("10", "12") == p("12", "1") == p("1", "10") == pytest.approx(2 / 3)  # a cycle
  assert p("10", "") == 1.0
  for a, b in (("10", "9"), ("7", ""), ("12", "12")):
    assert p(a, b) + p(b, a) == pytest.approx(1.0)
  assert p("12", "12") == 0.5
