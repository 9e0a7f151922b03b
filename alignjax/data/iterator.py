r"""A deterministic, resumable, multi-host batch iterator over a random-access data set.

Order. Epoch e visits the N examples in the order

    order_e = permutation_{(seed, e)}(0 .. N-1)   (numpy's default_rng([seed, e]); arange
                                                   when shuffle=False)                  (eq. 1)

and global batch k of epoch e is order_e[k G : (k + 1) G] for the global batch size G. With
`drop_remainder=True` an epoch has floor(N / G) batches and the last N mod G examples of
order_e are skipped (a different set each epoch when shuffling). With `drop_remainder=False`
it has ceil(N / G) batches; the last one is filled up to G with order_e[0 ..] again and its
`example_mask` is False on those fill rows, so shapes stay static (no recompilation) and an
evaluation can mask them out.

Processes. With n = process_count processes, process i takes rows
[i G / n, (i + 1) G / n) of every global batch (G must be divisible by n): the slices are
disjoint, their union is the global batch, and every process computes the same order_e from
the seed alone. Feed the process-local batch to `alignjax.parallel.shard_batch`.

State. `state()` is {"seed", "epoch", "position", "num_examples", "global_batch_size"} (plain
ints: JSON- and Orbax-friendly, the same on every process): `position` counts the global
batches already taken in `epoch`. `restore(state)` continues exactly at the next batch;
it refuses a state saved for another data-set size or batch size.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np

__all__ = ["BatchIterator", "Batchable"]

STATE_KEYS = ("seed", "epoch", "position", "num_examples", "global_batch_size")


class Batchable(Protocol):
  """A data set the iterator can batch: its size and `batch(indices) -> dict of arrays`."""

  def __len__(self) -> int:
    ...

  def batch(self, indices: np.ndarray) -> dict:
    ...


class BatchIterator:
  """Process-local batches (dicts of numpy arrays [G / n, ...]) of a `Batchable` (eq. 1).

  Each batch is `dataset.batch(indices)` plus "example_mask" (bool [G / n]). `num_epochs`
  None iterates forever; otherwise StopIteration after that many epochs.
  """

  def __init__(
      self,
      dataset: Batchable,
      global_batch_size: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      drop_remainder: bool = True,
      num_epochs: int | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
  ):
    self.dataset = dataset
    self.num_examples = len(dataset)
    self.global_batch_size = int(global_batch_size)
    self.seed, self.shuffle, self.drop_remainder = int(seed), shuffle, drop_remainder
    self.num_epochs = num_epochs
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    g, n = self.global_batch_size, self.process_count
    if g < 1:
      raise ValueError(f"BatchIterator: global_batch_size={g} must be >= 1")
    if not 0 <= self.process_index < n:
      raise ValueError(
          f"BatchIterator: process_index={self.process_index} not in [0, process_count={n})"
      )
    if g % n:
      raise ValueError(
          f"BatchIterator: global_batch_size={g} is not divisible by process_count={n}"
      )
    if self.num_examples == 0:
      raise ValueError("BatchIterator: the data set is empty")
    if drop_remainder and self.num_examples < g:
      raise ValueError(
          f"BatchIterator: {self.num_examples} examples < global_batch_size={g} with "
          "drop_remainder=True would give no batch; use drop_remainder=False or a smaller batch"
      )
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"BatchIterator: num_epochs={num_epochs} must be None or >= 1")
    self.epoch, self.position = 0, 0
    self._order_epoch, self._order = -1, None

  @property
  def batches_per_epoch(self) -> int:
    n, g = self.num_examples, self.global_batch_size
    return n // g if self.drop_remainder else -(-n // g)

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def order(self, epoch: int) -> np.ndarray:
    """order_e of eq. 1."""
    if self._order_epoch != epoch:
      if self.shuffle:
        self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      else:
        self._order = np.arange(self.num_examples)
      self._order_epoch = epoch
    return self._order

  def global_indices(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [G], example_mask [G]) of global batch `position` of `epoch`."""
    order, g = self.order(epoch), self.global_batch_size
    rows = np.arange(position * g, (position + 1) * g)
    mask = rows < self.num_examples
    return order[rows % self.num_examples], mask

  def state(self) -> dict[str, int]:
    return {
        "seed": self.seed,
        "epoch": self.epoch,
        "position": self.position,
        "num_examples": self.num_examples,
        "global_batch_size": self.global_batch_size,
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Continue from `state()` (values may be ints or 0-d arrays, e.g. from Orbax)."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise KeyError(f"BatchIterator.restore: state lacks keys {missing}; expected {STATE_KEYS}")
    state = {k: int(np.asarray(state[k])) for k in STATE_KEYS}
    for key in ("num_examples", "global_batch_size"):
      if state[key] != getattr(self, key):
        raise ValueError(
            f"BatchIterator.restore: state[{key!r}]={state[key]} but this iterator has "
            f"{key}={getattr(self, key)}; the saved position would not mean the same batches"
        )
    if not 0 <= state["position"] <= self.batches_per_epoch or state["epoch"] < 0:
      raise ValueError(
          f"BatchIterator.restore: epoch={state['epoch']}, position={state['position']} out of "
          f"range (epoch >= 0, 0 <= position <= {self.batches_per_epoch})"
      )
    self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    epoch, position = self.epoch, self.position
    if position >= self.batches_per_epoch:
      epoch, position = epoch + 1, 0
    if self.num_epochs is not None and epoch >= self.num_epochs:
      raise StopIteration
    indices, mask = self.global_indices(epoch, position)
    self.epoch, self.position = epoch, position + 1
    start = self.process_index * self.local_batch_size
    local = slice(start, start + self.local_batch_size)
    batch = dict(self.dataset.batch(indices[local]))
    if "example_mask" in batch:
      raise ValueError("BatchIterator: the data set's batch already has a key 'example_mask'")
    batch["example_mask"] = mask[local]
    return batch
