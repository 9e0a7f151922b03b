"""Shipped text-to-image prompt sets, prompt files, templates, sampling and the per-prompt stat
tracker (hand-computed advantages)."""

import json
import math

import numpy as np
import pytest

from alignjax.algorithms import ddpo
from alignjax.data import diffusion_prompts as dp
from alignjax.data.sources import DataError

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon "
    "fox wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake "
    "turtle frog chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()


def test_shipped_sets():
  assert dp.available_prompt_sets() == ["imagenet_animals", "simple_animals"]
  assert dp.prompt_set("simple_animals") == SIMPLE_ANIMALS and len(SIMPLE_ANIMALS) == 45
  animals = dp.prompt_set("imagenet_animals")
  assert len(animals) == 398  # ImageNet-1k class ids 0..397
  # spot checks of ImageNet class ids (first WordNet lemma of each class)
  known = {0: "tench", 1: "goldfish", 99: "goose", 151: "Chihuahua", 207: "golden retriever"}
  known |= {269: "timber wolf", 281: "tabby", 291: "lion", 340: "zebra", 397: "puffer"}
  assert {i: animals[i] for i in known} == known
  assert all(a == a.strip() and a for a in animals)
  animals.append("x")  # a copy: the shipped set is unchanged
  assert len(dp.prompt_set("imagenet_animals")) == 398
  for bad in ("nope", "../sources", 3):
    with pytest.raises(ValueError, match=r"unknown prompt set .*\['imagenet_animals', 'simple_"):
      dp.prompt_set(bad)


def test_load_prompt_file(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("a cat\n\n  a dog  \r\nlast")
  assert dp.load_prompt_file(txt) == ["a cat", "a dog", "last"]
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"prompt": "a cat", "id": 1}\n\n{"prompt": "a dog"}\n')
  assert dp.load_prompt_file(jsonl) == ["a cat", "a dog"]
  (tmp_path / "q.json").write_text('{"text": "x"}\n')
  assert dp.load_prompt_file(tmp_path / "q.json", key="text") == ["x"]
  cases = {
      "empty.txt": ("", r"empty.txt: no prompts"),
      "blank.jsonl": ("\n  \n", r"blank.jsonl: no prompts"),
      "bad.jsonl": ('{"prompt": "a"}\n{"prompt": \n', r"bad.jsonl:2: invalid JSON"),
      "list.jsonl": ("[1, 2]\n", r"list.jsonl:1: expected a JSON object, got list"),
      "key.jsonl": (
          '{"prompt": "a"}\n\n{"caption": "b"}\n',
          r"key.jsonl:3: field 'prompt'.*no such",
      ),
      "num.jsonl": ('{"prompt": 3}\n', r"num.jsonl:1: field 'prompt'.*got 3"),
  }
  for name, (text, match) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match):
      dp.load_prompt_file(tmp_path / name)
  (tmp_path / "latin1.txt").write_bytes("ok\nna\xefve\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8"):
    dp.load_prompt_file(tmp_path / "latin1.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt: no such prompt file"):
    dp.load_prompt_file(tmp_path / "missing.txt")
  with pytest.raises(DataError, match=r"p.csv: unknown prompt file extension '.csv'"):
    dp.load_prompt_file(tmp_path / "p.csv")


def test_format_and_sample():
  assert dp.format_prompts(["cat", "dog"], "a photo of a {}") == [
      "a photo of a cat",
      "a photo of a dog",
  ]
  assert dp.format_prompts(["cat"]) == ["cat"]
  assert dp.format_prompts(["cat"], "{{art}} {}") == ["{art} cat"]
  for bad in ("a photo", "{} and {}", "{0}", "{name}", "{"):
    with pytest.raises(ValueError, match="template"):
      dp.format_prompts(["cat"], bad)
  with pytest.raises(ValueError, match="not one str"):
    dp.format_prompts("cat", "a {}")
  prompts = ["a", "b", "c"]
  got = dp.sample_prompts(prompts, 5, np.random.default_rng(3))
  idx = np.random.default_rng(3).integers(0, 3, 5)
  assert got == [prompts[i] for i in idx]
  with pytest.raises(ValueError, match="batch_size"):
    dp.sample_prompts(prompts, 0, np.random.default_rng(0))
  with pytest.raises(ValueError, match="no prompts"):
    dp.sample_prompts([], 2, np.random.default_rng(0))
  with pytest.raises(TypeError, match="numpy Generator"):
    dp.sample_prompts(prompts, 2, 0)


def test_stat_tracker_is_ddpos_and_hand_computed():
  assert dp.PerPromptStatTracker is ddpo.PerPromptStatTracker  # reused, not duplicated
  eps = 1e-6
  tracker = dp.PerPromptStatTracker(buffer_size=3, min_count=2)
  # batch 1: "a" has 2 rewards {1, 3} (mean 2, std 1); "b" has 1 < min_count, so the batch
  # statistics: mean 14/3, std sqrt(134) / 3
  adv = tracker.update(["a", "a", "b"], np.array([1.0, 3.0, 10.0]))
  want_b = (10 - 14 / 3) / (math.sqrt(134) / 3 + eps)
  np.testing.assert_allclose(adv, [-1 / (1 + eps), 1 / (1 + eps), want_b], rtol=1e-6)
  assert adv.dtype == np.float32
  # batch 2: "b" buffer {10, 4} (mean 7, std 3); "a" buffer {1, 3, 5} (mean 3, std sqrt(8/3))
  adv = tracker.update(["b", "a"], np.array([4.0, 5.0]))
  np.testing.assert_allclose(adv, [-3 / (3 + eps), 2 / (math.sqrt(8 / 3) + eps)], rtol=1e-6)
  # the checkpointed state (through JSON) continues identically
  clone = dp.PerPromptStatTracker.from_state_dict(json.loads(json.dumps(tracker.state_dict())))
  assert clone.state_dict() == tracker.state_dict()
  # batch 3: "a" buffer keeps the last 3 rewards {3, 5, 7}: mean 5, std sqrt(8/3)
  for t in (tracker, clone):
    adv = t.update(["a"], np.array([7.0]))
    np.testing.assert_allclose(adv, [2 / (math.sqrt(8 / 3) + eps)], rtol=1e-6)
  assert tracker.state_dict()["buffers"] == {"a": [3.0, 5.0, 7.0], "b": [10.0, 4.0]}
