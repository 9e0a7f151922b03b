"""Tests of preference pairs (alignjax.data.preferences)."""

import json
import re

import numpy as np
import pytest

from alignjax.data import synthetic_language as sl
from alignjax.data.encoding import SyntheticTokenizer
from alignjax.data.iterator import BatchIterator
from alignjax.data.preferences import load_preferences
from alignjax.data.sources import DataError

TOK = SyntheticTokenizer()


def jsonl(path, records):
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return path


PAIRS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "12", "p_chosen": 0.75},
    {"prompt": "10-3=", "chosen": "7", "rejected": "6"},
]


def test_batch_is_prompt_plus_response_left_padded_with_a_response_mask(tmp_path):
  path = jsonl(tmp_path / "p.jsonl", PAIRS)
  pairs = load_preferences(path, TOK, max_length=9)
  batch = pairs.batch([0, 1])
  for side in ("chosen", "rejected"):
    for row, record in enumerate(PAIRS):
      full = sl.encode(record["prompt"] + record[side], eos=True)  # <bos> x y <eos>
      response = len(record[side]) + 1
      want_tokens = [sl.PAD_ID] * (9 - len(full)) + full
      np.testing.assert_array_equal(batch[side]["tokens"][row], want_tokens)
      np.testing.assert_array_equal(batch[side]["valid"][row], np.arange(9) >= 9 - len(full))
      np.testing.assert_array_equal(batch[side]["mask"][row], np.arange(9) >= 9 - response)
    # every masked token is scored by eq. 1 of lm/scoring.py: it has a valid predecessor
    valid, mask = batch[side]["valid"], batch[side]["mask"]
    scored = mask[:, 1:] & valid[:, 1:] & valid[:, :-1]
    np.testing.assert_array_equal(scored, mask[:, 1:])
    assert not mask[:, 0].any()
  np.testing.assert_allclose(batch["label"], [0.75, 1.0])
  assert batch["label"].dtype == np.float32
  np.testing.assert_array_equal(batch["index"], [0, 1])


def test_append_eos_false_and_label_key(tmp_path):
  path = jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "y": 0}])
  pairs = load_preferences(path, TOK, max_length=6, append_eos=False, label_key="y")
  assert pairs.chosen_ids[0] == sl.encode("2", bos=False)
  np.testing.assert_array_equal(pairs.labels, [0.0])


@pytest.mark.parametrize(
    "change, match",
    [
        ({"chosen": ""}, r":2: field 'chosen' is empty"),
        ({"rejected": "  "}, r":2: field 'rejected' is empty"),
        ({"rejected": None}, r":2: field 'rejected' must be a string, got NoneType"),
        ({"p_chosen": 1.5}, r":2: field 'p_chosen'=1.5 is outside \[0, 1\]"),
        ({"p_chosen": -0.1}, r":2: field 'p_chosen'=-0.1 is outside \[0, 1\]"),
        ({"p_chosen": "0.5"}, r":2: field 'p_chosen' must be a number in \[0, 1\]"),
        ({"p_chosen": True}, r":2: field 'p_chosen' must be a number"),
        ({"prompt": None}, r":2: field 'prompt' must be a string"),
    ],
)
def test_bad_pairs_name_file_line_and_key(tmp_path, change, match):
  path = jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {**PAIRS[1], **change}])
  with pytest.raises(DataError, match=re.escape(str(path)) + match):
    load_preferences(path, TOK, max_length=16)


def test_missing_field_names_the_key(tmp_path):
  path = jsonl(tmp_path / "bad.jsonl", [{"prompt": "1=", "chosen": "1"}])
  with pytest.raises(DataError, match=re.escape(f"{path}:1: missing field 'rejected'")):
    load_preferences(path, TOK, max_length=16)


def test_too_long_pairs_error_drop_or_truncate(tmp_path):
  records = [PAIRS[1], {"prompt": "123+456=", "chosen": "579", "rejected": "578"}]
  path = jsonl(tmp_path / "p.jsonl", records)
  # pair 2: prompt 9 tokens + longest response 4 = 13 > 10
  with pytest.raises(DataError, match=re.escape(f"{path}:2: prompt + longest response is 13")):
    load_preferences(path, TOK, max_length=10)
  with pytest.raises(DataError, match=re.escape(f"{path}:2: the prompt is 9 tokens") + ".*8"):
    load_preferences(path, TOK, max_length=16, max_prompt_length=8)
  dropped = load_preferences(path, TOK, max_length=10, on_too_long="drop")
  assert len(dropped) == 1 and dropped.num_dropped == 1
  cut = load_preferences(path, TOK, max_length=10, on_too_long="truncate_left")
  assert cut.prompt_ids[1] == sl.encode("123+456=")[-6:] and cut.num_truncated == 1
  assert cut.batch([1])["chosen"]["valid"].all()  # exactly max_length tokens
  with pytest.raises(DataError, match="prompt \\+ longest response"):  # no room for a prompt
    load_preferences(path, TOK, max_length=4, on_too_long="truncate_left")
  with pytest.raises(ValueError, match="max_prompt_length=10 must be in"):
    load_preferences(path, TOK, max_length=10, max_prompt_length=10)


def test_chat_prompts_and_iterator(tmp_path):
  from alignjax.models.convert.tokenizer import load_tokenizer

  sl.save_tokenizer(str(tmp_path / "tok"))
  tok = load_tokenizer(str(tmp_path / "tok"))
  tok.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
  record = {"messages": [{"role": "user", "content": "2+2"}], "chosen": "4", "rejected": "5"}
  path = jsonl(tmp_path / "c.jsonl", [record] * 4)
  pairs = load_preferences(path, tok, max_length=8)
  assert pairs.prompt_ids[0] == sl.encode("2+2=", bos=False)
  assert pairs.chosen_ids[0] == sl.encode("4", bos=False, eos=True)
  it = BatchIterator(pairs, 4, process_index=1, process_count=2)
  batch = next(it)
  assert batch["chosen"]["tokens"].shape == (2, 8) and batch["example_mask"].all()
