"""Tests of record sources (alignjax.data.sources): files, HF datasets on disk, local TFDS."""

import os
import re
import sys

import numpy as np
import pytest

from alignjax.data import synthetic_language as sl
from alignjax.data.encoding import SyntheticTokenizer
from alignjax.data.preferences import load_preferences
from alignjax.data.prompts import load_prompts
from alignjax.data.sources import (
    DataError,
    HFDiskSource,
    ListSource,
    TFDSSource,
    open_source,
    read_jsonl,
    read_text,
)

RECORDS = {
    "prompt": ["1+2=", "7-7=", "9+9="],
    "chosen": ["3", "0", "18"],
    "rejected": ["4", "1", "81"],
    "p_chosen": [0.75, 1.0, 0.5],
}


def test_text_and_jsonl_keep_line_numbers(tmp_path):
  (tmp_path / "a.txt").write_text("x y\n\n \r\nz\r\n")
  text = read_text(str(tmp_path / "a.txt"), key="q")
  assert list(text.records) == [{"q": "x y"}, {"q": "z"}]
  assert text.where(1) == f"{tmp_path / 'a.txt'}:4"
  (tmp_path / "a.jsonl").write_text('\n{"a": 1}\n\n{"b": [2]}\n')
  lines = open_source(tmp_path / "a.jsonl")
  assert [lines[i] for i in range(len(lines))] == [{"a": 1}, {"b": [2]}]
  assert [lines.where(i) for i in range(2)] == [f"{tmp_path / 'a.jsonl'}:{n}" for n in (2, 4)]
  (tmp_path / "b.jsonl").write_text('{"a": 1}\n{"a": }\n')
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'b.jsonl'}:2: invalid JSON")):
    read_jsonl(str(tmp_path / "b.jsonl"))


def test_open_source_errors():
  with pytest.raises(DataError, match=r"unknown file extension '.csv'; valid choices.*'.jsonl'"):
    open_source("data.csv")
  with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
    open_source("missing.txt")
  with pytest.raises(ValueError, match="2 records but 1 locations"):
    ListSource([{}, {}], ["a"])


def test_hf_dataset_on_disk(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_dict(RECORDS).save_to_disk(str(tmp_path / "single"))
  source = HFDiskSource(tmp_path / "single")
  assert len(source) == 3 and source[2] == {k: v[2] for k, v in RECORDS.items()}
  pairs = load_preferences(source, SyntheticTokenizer(), max_length=8)
  np.testing.assert_allclose(pairs.labels, RECORDS["p_chosen"])
  assert pairs.chosen_ids[2] == sl.encode("18", bos=False, eos=True)
  with pytest.raises(DataError, match="no splits"):
    HFDiskSource(tmp_path / "single", split="train")

  bad = dict(RECORDS, prompt=["1+2=", "x", "9+9="])
  dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(bad)})
  dd.save_to_disk(str(tmp_path / "dict"))
  with pytest.raises(DataError, match=r"split=None, valid choices are \['train'\]"):
    HFDiskSource(tmp_path / "dict")
  with pytest.raises(
      DataError, match=re.escape(f"{tmp_path / 'dict'}[train][row 1]: field 'prompt'")
  ):
    load_prompts(HFDiskSource(tmp_path / "dict", split="train"), SyntheticTokenizer(), max_length=8)


def _tiny_tfds(data_dir):
  """Prepare a 3-example array_record TFDS dataset (no TensorFlow needed)."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyPreferences(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      text = tfds.features.Text()
      features = {k: text for k in ("prompt", "chosen", "rejected")}
      features["p_chosen"] = tfds.features.Scalar(dtype=np.float32)
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {k: v[i] for k, v in RECORDS.items()}

  TinyPreferences(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return "tiny_preferences"


def test_tfds_data_source(tmp_path):
  name = _tiny_tfds(tmp_path)
  source = TFDSSource(name, split="train", data_dir=tmp_path)
  assert len(source) == 3
  rows = sorted((source[i] for i in range(3)), key=lambda r: r["prompt"])
  assert [r["prompt"] for r in rows] == sorted(RECORDS["prompt"])  # bytes decoded to str
  assert source.where(1) == "tfds:tiny_preferences/train[row 1]"
  pairs = load_preferences(source, SyntheticTokenizer(), max_length=8)
  by_prompt = {sl.decode(p): lab for p, lab in zip(pairs.prompt_ids, pairs.labels)}
  assert by_prompt == dict(zip(RECORDS["prompt"], RECORDS["p_chosen"]))
  with pytest.raises(DataError, match="tfds:tiny_preferences/validation: cannot open"):
    TFDSSource(name, split="validation", data_dir=tmp_path)


@pytest.mark.parametrize(
    "module, make, match",
    [
        ("datasets", lambda: HFDiskSource("x"), r"pip install datasets"),
        (
            "tensorflow_datasets",
            lambda: TFDSSource("x", split="t", data_dir="d"),
            r"pip install tensorflow-datasets array_record",
        ),
    ],
)
def test_optional_packages_are_lazy_with_a_clear_error(monkeypatch, module, make, match):
  monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
  with pytest.raises(ImportError, match=match):
    make()


def test_importing_the_data_package_does_not_import_optional_packages():
  import subprocess

  code = (
      "import sys, alignjax.data; "
      "assert not {'datasets', 'tensorflow_datasets'} & set(sys.modules), 'imported'"
  )
  subprocess.run(
      [sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )
