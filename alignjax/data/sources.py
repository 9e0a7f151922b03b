"""Random-access record sources: JSONL and text files, HF `datasets` on disk, local TFDS.

A source is a sequence of records (dicts of plain Python values: str, int, float, lists,
dicts) with `len(source)`, `source[i]` and `source.where(i)`, a location for error
messages: "path:line" for files (the 1-based line number in the file, blank lines
skipped but counted), "path[split][row]" for Hugging Face datasets and
"tfds:name/split[row]" for TFDS. `prompts.load_prompts` and `preferences.load_preferences`
read any source; a path is opened with `open_source` by its extension.

Hugging Face `datasets` and `tensorflow_datasets` are optional: they are imported only when
such a source is opened, with an ImportError naming the package to install. TFDS is read
through `tfds.data_source` (array_record files, random access): it needs neither TensorFlow
nor network access; prepare the dataset once with `tfds build` (or a builder's
`download_and_prepare`) using `file_format="array_record"`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Protocol, Sequence

__all__ = [
    "DataError",
    "HFDiskSource",
    "ListSource",
    "Source",
    "TFDSSource",
    "open_source",
    "read_jsonl",
    "read_text",
]

TEXT_EXTENSIONS = (".txt",)
JSONL_EXTENSIONS = (".jsonl", ".json")


class DataError(ValueError):
  """A data file or record is malformed; the message names where (file:line) and the key."""


class Source(Protocol):
  """Random-access records with a location for each (for error messages)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict:
    ...

  def where(self, index: int) -> str:
    ...


@dataclasses.dataclass(frozen=True)
class ListSource:
  """Records held in memory with their locations (what the file readers return)."""

  records: Sequence[dict]
  locations: Sequence[str]

  def __post_init__(self):
    if len(self.records) != len(self.locations):
      raise ValueError(
          f"ListSource: {len(self.records)} records but {len(self.locations)} locations"
      )

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return self.records[index]

  def where(self, index: int) -> str:
    return self.locations[index]


def _lines(path: str):
  """(1-based line number, line without its newline) for the non-blank lines of a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if line.strip():
        yield number, line


def read_text(path: str, *, key: str = "prompt") -> ListSource:
  """One record {key: line} per non-blank line of a UTF-8 text file."""
  records, locations = [], []
  for number, line in _lines(path):
    records.append({key: line})
    locations.append(f"{path}:{number}")
  return ListSource(records, locations)


def read_jsonl(path: str) -> ListSource:
  """One record per non-blank line of a JSON Lines file; each line must be a JSON object."""
  records, locations = [], []
  for number, line in _lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataError(
          f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}"
      )
    records.append(record)
    locations.append(f"{path}:{number}")
  return ListSource(records, locations)


def open_source(path: str | os.PathLike, *, text_key: str = "prompt") -> ListSource:
  """A file source by extension: .txt (one record {text_key: line}), .jsonl / .json."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext in TEXT_EXTENSIONS:
    return read_text(path, key=text_key)
  if ext in JSONL_EXTENSIONS:
    return read_jsonl(path)
  raise DataError(
      f"{path}: unknown file extension {ext!r}; valid choices are "
      f"{TEXT_EXTENSIONS + JSONL_EXTENSIONS} (or pass an HFDiskSource / TFDSSource)"
  )


def _plain(value: Any) -> Any:
  """numpy scalars/arrays and bytes (TFDS text) -> plain Python values."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "tolist"):  # numpy scalar or array
    return _plain(value.tolist())
  return value


class HFDiskSource:
  """A Hugging Face dataset saved with `save_to_disk`, read by `datasets.load_from_disk`.

  A saved DatasetDict needs `split` (one of its keys); a saved Dataset takes none.
  """

  def __init__(self, path: str | os.PathLike, split: str | None = None):
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          "HFDiskSource needs the Hugging Face `datasets` package (pip install datasets)"
      ) from e
    self.path = os.fspath(path)
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"{self.path}: no such directory (a datasets.save_to_disk folder)")
    data = datasets.load_from_disk(self.path)
    if isinstance(data, datasets.DatasetDict):
      if split not in data:
        raise DataError(
            f"{self.path}: a DatasetDict; split={split!r}, valid choices are {sorted(data)}"
        )
      data = data[split]
    elif split is not None:
      raise DataError(f"{self.path}: a single Dataset (no splits); pass split=None, not {split!r}")
    self.split = split
    self._data = data

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    return _plain(self._data[int(index)])

  def where(self, index: int) -> str:
    split = "" if self.split is None else f"[{self.split}]"
    return f"{self.path}{split}[row {index}]"


class TFDSSource:
  """A prepared local TFDS dataset (array_record) read by `tfds.data_source` (no TensorFlow)."""

  def __init__(self, name: str, *, split: str, data_dir: str | os.PathLike):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          "TFDSSource needs `tensorflow-datasets` and `array_record` "
          "(pip install tensorflow-datasets array_record); TensorFlow is not needed"
      ) from e
    self.name, self.split, self.data_dir = name, split, os.fspath(data_dir)
    try:
      self._data = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
    except Exception as e:  # TFDS raises several types for a missing/unprepared dataset
      raise DataError(
          f"tfds:{name}/{split}: cannot open in data_dir={self.data_dir!r} "
          f"({type(e).__name__}: {e}); prepare it with file_format='array_record'"
      ) from e

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    return _plain(self._data[int(index)])

  def where(self, index: int) -> str:
    return f"tfds:{self.name}/{self.split}[row {index}]"
