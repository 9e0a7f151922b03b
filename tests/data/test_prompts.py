"""Tests of prompt sets (alignjax.data.prompts) and record encoding (alignjax.data.encoding)."""

import json
import re

import numpy as np
import pytest

from alignjax.data import synthetic_language as sl
from alignjax.data.encoding import SyntheticTokenizer, pad_id_of
from alignjax.data.iterator import BatchIterator
from alignjax.data.prompts import load_prompts, prompt_set_from_ids
from alignjax.data.sources import DataError

CHAT = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  """The synthetic language's tokenizer.json loaded with transformers, plus a chat template."""
  from alignjax.models.convert.tokenizer import load_tokenizer

  directory = tmp_path_factory.mktemp("tok")
  sl.save_tokenizer(str(directory))
  tok = load_tokenizer(str(directory))
  tok.chat_template = CHAT
  return tok


def write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def jsonl(path, records):
  return write(path, [json.dumps(r) if isinstance(r, dict) else r for r in records])


def left_pad(ids, length, pad=0):
  return [pad] * (length - len(ids)) + ids, [False] * (length - len(ids)) + [True] * len(ids)


def test_synthetic_tokenizer_matches_the_language():
  tok = SyntheticTokenizer()
  assert tok.encode("12+7=") == sl.encode("12+7=")
  assert tok.encode("19", add_special_tokens=False) == sl.encode("19", bos=False)
  assert tok.decode(sl.encode("19", eos=True) + [5]) == "19"
  assert pad_id_of(tok) == sl.PAD_ID


def test_text_file_prompts_batch_left_padded(tmp_path):
  path = write(tmp_path / "p.txt", ["1+2=", "", "   ", "10-3="])
  prompts = load_prompts(path, SyntheticTokenizer(), max_length=8)
  assert len(prompts) == 2 and prompts.locations == [f"{path}:1", f"{path}:4"]
  batch = prompts.batch([1, 0])
  want = [left_pad(sl.encode("10-3="), 8), left_pad(sl.encode("1+2="), 8)]  # eq. 1
  np.testing.assert_array_equal(batch["tokens"], [w[0] for w in want])
  np.testing.assert_array_equal(batch["valid"], [w[1] for w in want])
  assert batch["tokens"].dtype == np.int32 and batch["valid"].dtype == bool
  np.testing.assert_array_equal(batch["index"], [1, 0])


def test_hf_tokenizer_gives_the_same_tokens_as_the_adapter(tmp_path, hf_tokenizer):
  path = jsonl(tmp_path / "p.jsonl", [{"q": "12+7=", "answer": "19"}, {"q": "3-3="}])
  a = load_prompts(path, hf_tokenizer, max_length=7, key="q")
  b = load_prompts(path, SyntheticTokenizer(), max_length=7, key="q")
  np.testing.assert_array_equal(a.batch([0, 1])["tokens"], b.batch([0, 1])["tokens"])
  assert a.records[0]["answer"] == "19"  # metadata for rewards, found through "index"


def test_chat_template_from_messages_or_forced(tmp_path, hf_tokenizer):
  path = jsonl(
      tmp_path / "c.jsonl",
      [{"messages": [{"role": "user", "content": "1+2"}]}, {"prompt": "4+4"}],
  )
  prompts = load_prompts(path, hf_tokenizer, max_length=8)
  # the template ends the user turn with "="; the plain prompt gets <bos> from the tokenizer
  assert prompts.ids[0] == sl.encode("1+2=", bos=False)
  assert prompts.ids[1] == sl.encode("4+4")
  forced = load_prompts(path, hf_tokenizer, max_length=8, use_chat_template=True)
  assert forced.ids[1] == sl.encode("4+4=", bos=False)
  with pytest.raises(DataError, match=re.escape(f"{path}:1: needs a chat template")):
    load_prompts(path, SyntheticTokenizer(), max_length=8)


@pytest.mark.parametrize(
    "record, match",
    [
        ('{"prompt": "1+2=",', r":2: invalid JSON"),
        ({"text": "1"}, r":2: missing field 'prompt'"),
        ({"prompt": 3}, r":2: field 'prompt' must be a string, got int"),
        ({"prompt": "ab"}, r":2: field 'prompt': encode: characters \['a', 'b'\]"),
        ({"messages": [{"role": "user"}]}, r":2: messages\[0\]: missing field 'content'"),
        ({"messages": "1+2"}, r":2: field 'messages' must be a non-empty list"),
        ("[1, 2]", r":2: expected a JSON object per line, got list"),
    ],
)
def test_bad_records_name_file_line_and_key(tmp_path, record, match):
  path = jsonl(tmp_path / "bad.jsonl", [{"prompt": "1="}, record])
  with pytest.raises(DataError, match=re.escape(str(path)) + match):
    load_prompts(path, SyntheticTokenizer(), max_length=8)


def test_too_long_prompts_error_drop_or_truncate(tmp_path):
  path = write(tmp_path / "p.txt", ["1+2=", "", "123+456="])
  tok = SyntheticTokenizer()
  with pytest.raises(
      DataError,
      match=re.escape(f"{path}:3: the prompt is 9 tokens, more than the maximum 6")
      + ".*'drop', 'truncate_left'",
  ):
    load_prompts(path, tok, max_length=6)
  dropped = load_prompts(path, tok, max_length=6, on_too_long="drop")
  assert len(dropped) == 1 and dropped.num_dropped == 1
  cut = load_prompts(path, tok, max_length=6, on_too_long="truncate_left")
  assert cut.ids[1] == sl.encode("123+456=")[-6:] and cut.num_truncated == 1
  with pytest.raises(ValueError, match="valid choices are \\('error', 'drop', 'truncate_left'\\)"):
    load_prompts(path, tok, max_length=6, on_too_long="skip")
  with pytest.raises(DataError, match="no prompts left"):
    load_prompts(path, tok, max_length=2, on_too_long="drop")


def test_prompt_set_from_ids_feeds_the_iterator():
  pairs = sl.equations("test", max_operand=9)
  ids = [sl.encode(p) for p, _ in pairs]
  prompts = prompt_set_from_ids(ids, max_length=5, records=[{"answer": a} for _, a in pairs])
  it = BatchIterator(prompts, 4, seed=0, process_index=0, process_count=1)
  batch = next(it)
  for row, i in enumerate(batch["index"]):
    assert sl.decode(batch["tokens"][row][batch["valid"][row]]) == pairs[i][0]
  with pytest.raises(DataError, match=r"ids\[1\]: prompt is 0 tokens"):
    prompt_set_from_ids([[1], []], max_length=5)
