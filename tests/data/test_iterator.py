"""Tests of the deterministic, resumable, multi-host BatchIterator (alignjax.data.iterator)."""

import json

import numpy as np
import pytest

from alignjax.data.iterator import BatchIterator


class Indices:
  """A Batchable whose batch is just its indices."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def batch(self, indices):
    return {"index": np.asarray(indices)}


def take(it, k):
  return [next(it) for _ in range(k)]


def test_epoch_order_is_the_seeded_permutation_and_covers_each_example_once():
  it = BatchIterator(Indices(10), 4, seed=3, drop_remainder=False, process_count=1, process_index=0)
  assert it.batches_per_epoch == 3
  batches = take(it, 3)
  rows = np.concatenate([b["index"] for b in batches])
  masks = np.concatenate([b["example_mask"] for b in batches])
  expected = np.random.default_rng([3, 0]).permutation(10)  # eq. 1, re-derived
  np.testing.assert_array_equal(rows[:10], expected)
  np.testing.assert_array_equal(rows[10:], expected[:2])  # the fill wraps to the epoch start
  np.testing.assert_array_equal(masks, np.arange(12) < 10)
  epoch1 = np.concatenate([b["index"] for b in take(it, 3)])[:10]
  np.testing.assert_array_equal(epoch1, np.random.default_rng([3, 1]).permutation(10))
  assert not np.array_equal(epoch1, expected)


def test_drop_remainder_and_no_shuffle():
  it = BatchIterator(Indices(10), 4, shuffle=False, process_count=1, process_index=0)
  assert it.batches_per_epoch == 2
  got = [b["index"].tolist() for b in take(it, 3)]
  assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]  # 8, 9 dropped; next epoch starts
  assert all(next(it)["example_mask"].all() for _ in range(2))


def test_processes_get_disjoint_slices_whose_union_is_the_global_batch():
  def run(i, n):
    it = BatchIterator(Indices(23), 6, seed=5, process_index=i, process_count=n)
    return [b["index"] for b in take(it, 7)]

  single = run(0, 1)
  for n in (2, 3):
    per_process = [run(i, n) for i in range(n)]
    for k in range(7):
      parts = [per_process[i][k] for i in range(n)]
      assert all(p.shape == (6 // n,) for p in parts)
      np.testing.assert_array_equal(np.concatenate(parts), single[k])
      assert len(set(np.concatenate(parts).tolist())) == 6


@pytest.mark.parametrize("k", [0, 2, 5, 9])
def test_restore_continues_exactly_where_the_run_stopped(k):
  def make():
    return BatchIterator(
        Indices(11), 4, seed=7, drop_remainder=False, process_index=1, process_count=2
    )

  reference = take(make(), k + 6)
  it = make()
  take(it, k)
  state = json.loads(json.dumps(it.state()))  # saved as JSON alongside a checkpoint
  resumed = make()
  resumed.restore({key: np.asarray(v) for key, v in state.items()})  # e.g. Orbax arrays
  for want, got in zip(reference[k:], take(resumed, 6)):
    np.testing.assert_array_equal(got["index"], want["index"])
    np.testing.assert_array_equal(got["example_mask"], want["example_mask"])


def test_state_values_and_num_epochs():
  it = BatchIterator(Indices(8), 4, seed=1, num_epochs=2, process_index=0, process_count=1)
  assert it.state() == {
      "seed": 1,
      "epoch": 0,
      "position": 0,
      "num_examples": 8,
      "global_batch_size": 4,
  }
  assert len(list(it)) == 4
  assert it.state()["epoch"] == 1 and it.state()["position"] == 2


def test_restore_refuses_incompatible_states():
  it = BatchIterator(Indices(8), 4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="num_examples"):
    it.restore({**it.state(), "num_examples": 9})
  with pytest.raises(KeyError, match="position"):
    it.restore({"seed": 0, "epoch": 0})
  with pytest.raises(ValueError, match="position=5"):
    it.restore({**it.state(), "position": 5})


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="divisible by process_count=4"):
    BatchIterator(Indices(8), 6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="drop_remainder"):
    BatchIterator(Indices(3), 4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="process_index=2"):
    BatchIterator(Indices(8), 4, process_index=2, process_count=2)
