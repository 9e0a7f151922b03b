"""Tokenizer loading from a checkpoint directory, chat templates, left-padded batches."""

import numpy as np
import pytest
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from alignjax.models.convert import (
    apply_chat_template,
    copy_tokenizer_files,
    encode_batch,
    load_tokenizer,
    pad_left,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>"]
WORDS = ["hello", "world", "how", "are", "you", "fine"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
    "{{ eos_token }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def save_tokenizer(directory, chat_template=TEMPLATE):
  tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = T.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token="<s>",
      eos_token="</s>",
      pad_token="<pad>",
      unk_token="<unk>",
      additional_special_tokens=["<user>", "<assistant>"],
  )
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(str(directory))


def test_chat_template_and_plain_encoding(tmp_path):
  save_tokenizer(tmp_path)
  tokenizer = load_tokenizer(str(tmp_path))
  messages = [
      {"role": "user", "content": "hello world"},
      {"role": "assistant", "content": "fine"},
      {"role": "user", "content": "how are you"},
  ]
  ids = apply_chat_template(tokenizer, messages)
  # "<s><user> hello world </s> <assistant> fine </s> <user> how are you </s> <assistant>"
  expected = [
      "<s>",
      "<user>",
      "hello",
      "world",
      "</s>",
      "<assistant>",
      "fine",
      "</s>",
      "<user>",
      "how",
      "are",
      "you",
      "</s>",
      "<assistant>",
  ]
  assert ids == [VOCAB[w] for w in expected]
  assert apply_chat_template(tokenizer, messages[:1], add_generation_prompt=False) == [
      VOCAB[w] for w in ["<s>", "<user>", "hello", "world", "</s>"]
  ]
  assert tokenizer.encode("how are you", add_special_tokens=False) == [8, 9, 10]

  tokens, valid = encode_batch(tokenizer, ["hello world", "fine", "you"], max_length=4, length=3)
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, [[0, 6, 7], [0, 0, 11], [0, 0, 10]])  # <pad> = 0
  np.testing.assert_array_equal(valid, [[0, 1, 1], [0, 0, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="exceed the maximum prompt length 1"):
    encode_batch(tokenizer, ["hello world"], max_length=1)


def test_missing_template_and_files(tmp_path):
  save_tokenizer(tmp_path / "plain", chat_template=None)
  with pytest.raises(ValueError, match="has no chat template"):
    apply_chat_template(
        load_tokenizer(str(tmp_path / "plain")), [{"role": "user", "content": "hello"}]
    )
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    load_tokenizer(str(tmp_path))
  copied = copy_tokenizer_files(str(tmp_path / "plain"), str(tmp_path / "copy"))
  assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
  assert load_tokenizer(str(tmp_path / "copy")).encode("fine", add_special_tokens=False) == [11]


def test_pad_left():
  tokens, valid = pad_left([[5, 6, 7], [8], []], max_length=4, pad_id=0)
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8], [0, 0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
  tokens, _ = pad_left([[5]], max_length=4, pad_id=9, length=3)
  np.testing.assert_array_equal(tokens, [[9, 9, 5]])
  with pytest.raises(
      ValueError, match=r"\(index, length\) \[\(1, 5\)\] exceed the maximum " "prompt length 4"
  ):
    pad_left([[1], [1, 2, 3, 4, 5]], max_length=4)
  with pytest.raises(ValueError, match="length=2 is shorter than the longest sequence 3"):
    pad_left([[1, 2, 3]], max_length=4, length=2)
