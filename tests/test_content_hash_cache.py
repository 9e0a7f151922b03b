"""The per-file sha256 cache of alignjax.run_identity.content_hash (its eq. 1)."""

import hashlib
import json
import logging
import os
import time

import pytest

from alignjax import run_identity
from alignjax.checkpoint import content_hash, frozen_model_metadata

HOUR_NS = 3600 * 10**9


@pytest.fixture
def reads(monkeypatch):
  """The paths whose bytes were read, in order (every call of the file hash)."""
  seen = []
  real = run_identity._file_sha256

  def counting(path):
    seen.append(os.path.basename(path))
    return real(path)

  monkeypatch.setattr(run_identity, "_file_sha256", counting)
  return seen


@pytest.fixture
def settled(monkeypatch):
  """Files written by the test count as settled (their ctime is necessarily fresh)."""
  monkeypatch.setattr(run_identity, "_RACY_WINDOW_NS", -HOUR_NS)


def write(path, data: bytes, mtime_ns=None):
  path.write_bytes(data)
  mtime_ns = time.time_ns() - HOUR_NS if mtime_ns is None else mtime_ns
  os.utime(path, ns=(mtime_ns, mtime_ns))
  return path


def sha(data: bytes) -> str:
  return "sha256:" + hashlib.sha256(data).hexdigest()


def test_second_call_does_not_read_the_files_again(tmp_path, reads, settled):
  cache = tmp_path / "cache" / "hashes.json"  # its directory is created on the first write
  f = write(tmp_path / "unet.safetensors", b"weights" * 1000)
  assert content_hash(f, cache=cache) == sha(b"weights" * 1000)
  assert reads == ["unet.safetensors"]
  assert content_hash(f, cache=cache) == sha(b"weights" * 1000)
  assert reads == ["unet.safetensors"]  # served from the cache

  d = tmp_path / "model"
  (d / "sub").mkdir(parents=True)
  write(d / "config.json", b"{}")
  write(d / "sub" / "w.bin", b"abc")
  uncached = content_hash(d, cache=False)
  reads.clear()
  assert content_hash(d, cache=cache) == uncached
  assert sorted(reads) == ["config.json", "w.bin"]
  assert frozen_model_metadata(d, cache=cache) == {"path": str(d), "hash": uncached}
  assert sorted(reads) == ["config.json", "w.bin"]  # no file read twice
  entries = json.loads(cache.read_text())["entries"]
  assert set(entries) == {os.path.realpath(p) for p in (f, d / "config.json", d / "sub" / "w.bin")}


def test_a_changed_size_or_mtime_is_hashed_again(tmp_path, reads, settled):
  cache = tmp_path / "hashes.json"
  f = write(tmp_path / "w.bin", b"version-1", mtime_ns=10**18)
  first = content_hash(f, cache=cache)
  assert reads == ["w.bin"]

  write(f, b"version-22", mtime_ns=10**18)  # another size, same mtime
  assert content_hash(f, cache=cache) == sha(b"version-22") != first
  assert len(reads) == 2
  write(f, b"version-33", mtime_ns=10**18 + 1)  # same size, another mtime (by 1 ns)
  assert content_hash(f, cache=cache) == sha(b"version-33")
  assert len(reads) == 3
  os.utime(f, ns=(10**18 + 2, 10**18 + 2))  # only touched: hashed again, same hash
  assert content_hash(f, cache=cache) == sha(b"version-33")
  assert len(reads) == 4
  assert content_hash(f, cache=cache) == sha(b"version-33")
  assert len(reads) == 4


def test_same_size_and_restored_mtime_is_hashed_again(tmp_path, reads, settled):
  """cp -p / rsync -a / tar put back the mtime of new content: the ctime still differs."""
  cache = tmp_path / "hashes.json"
  f = write(tmp_path / "w.bin", b"version-1", mtime_ns=10**18)
  ctime = os.stat(f).st_ctime_ns
  assert content_hash(f, cache=cache) == sha(b"version-1")
  time.sleep(0.05)
  write(f, b"version-2", mtime_ns=10**18)
  if os.stat(f).st_ctime_ns == ctime:
    pytest.skip("this filesystem's ctime did not advance in 50 ms")
  assert content_hash(f, cache=cache) == sha(b"version-2")
  assert reads == ["w.bin", "w.bin"]


def test_a_file_written_just_now_is_not_cached(tmp_path, reads):
  """A write in the same timestamp tick as the hash would keep size and mtime: not stored."""
  cache = tmp_path / "hashes.json"
  f = tmp_path / "w.bin"
  f.write_bytes(b"fresh")
  assert content_hash(f, cache=cache) == content_hash(f, cache=cache) == sha(b"fresh")
  assert reads == ["w.bin", "w.bin"]
  assert not cache.exists()  # nothing new to store: the cache is not written


def test_a_cache_entry_is_trusted_only_with_its_own_stat(tmp_path, reads, settled):
  cache = tmp_path / "hashes.json"
  f = write(tmp_path / "w.bin", b"real")
  st = os.stat(f)
  stale = [st.st_size, st.st_mtime_ns - 1, st.st_ctime_ns, st.st_ino]
  entries = {os.path.realpath(f): {"stat": stale, "sha256": "0" * 64}}
  cache.write_text(json.dumps({"version": 1, "entries": entries}))
  assert content_hash(f, cache=cache) == sha(b"real")
  assert reads == ["w.bin"]


@pytest.mark.parametrize("kind", ["corrupt", "wrong_shape", "parent_is_a_file", "a_directory"])
def test_a_broken_cache_never_fails_the_hash(tmp_path, reads, settled, caplog, kind):
  f = write(tmp_path / "w.bin", b"weights")
  cache = tmp_path / "hashes.json"
  if kind == "corrupt":
    cache.write_text('{"version": 1, "entries": {')  # a half-written file
  elif kind == "wrong_shape":
    cache.write_text(json.dumps({"version": 1, "entries": [1, 2]}))
  elif kind == "parent_is_a_file":
    cache = write(tmp_path / "not_a_dir", b"x") / "hashes.json"
  else:
    cache.mkdir()
  with caplog.at_level(logging.WARNING, logger="alignjax.run_identity"):
    assert content_hash(f, cache=cache) == sha(b"weights")
    assert content_hash(f, cache=cache) == sha(b"weights")
  if kind in ("corrupt", "wrong_shape"):  # rewritten whole on the first call, then used
    assert reads == ["w.bin"]
    assert os.path.realpath(f) in json.loads(cache.read_text())["entries"]
  else:
    assert reads == ["w.bin", "w.bin"] and "content hash cache" in caplog.text
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temporary left


def test_an_unwritable_cache_directory_only_warns(tmp_path, reads, settled, caplog):
  if os.geteuid() == 0:
    pytest.skip("root writes into read-only directories")
  f = write(tmp_path / "w.bin", b"weights")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with caplog.at_level(logging.WARNING, logger="alignjax.run_identity"):
      assert content_hash(f, cache=ro / "hashes.json") == sha(b"weights")
  finally:
    ro.chmod(0o700)
  assert "could not write the content hash cache" in caplog.text


def test_the_cache_file_inside_a_hashed_directory_is_skipped(tmp_path, settled):
  d = tmp_path / "model"
  d.mkdir()
  write(d / "w.bin", b"weights")
  before = content_hash(d, cache=False)
  assert content_hash(d, cache=d / "hashes.json") == before
  assert (d / "hashes.json").exists()
  assert content_hash(d, cache=d / "hashes.json") == before


def test_entries_of_separate_calls_accumulate(tmp_path, reads, settled):
  cache = tmp_path / "hashes.json"
  a, b = write(tmp_path / "a.bin", b"a"), write(tmp_path / "b.bin", b"b")
  content_hash(a, cache=cache)
  content_hash(b, cache=cache)
  content_hash(a, cache=cache)
  content_hash(b, cache=cache)
  assert reads == ["a.bin", "b.bin"]


def test_default_cache_location_and_switch(tmp_path, monkeypatch, reads, settled):
  monkeypatch.delenv(run_identity.HASH_CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert run_identity.default_hash_cache() == str(
      tmp_path / "xdg" / "alignjax" / "content_hashes.json"
  )
  f = write(tmp_path / "w.bin", b"weights")
  frozen_model_metadata(f)
  frozen_model_metadata(f)
  assert reads == ["w.bin"] and (tmp_path / "xdg" / "alignjax" / "content_hashes.json").exists()
  monkeypatch.setenv(run_identity.HASH_CACHE_ENV, str(tmp_path / "mine.json"))
  assert run_identity.default_hash_cache() == str(tmp_path / "mine.json")
  for off in ("", "off", "0"):
    monkeypatch.setenv(run_identity.HASH_CACHE_ENV, off)
    assert run_identity.default_hash_cache() is None
  reads.clear()
  content_hash(f)
  content_hash(f)
  assert reads == ["w.bin", "w.bin"]
