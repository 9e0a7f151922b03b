"""Running host rewards off the main thread, overlapped with device work.

A training loop that scores samples with a host reward (e.g. JPEG size) would otherwise
wait for each batch twice: for the device -> host copy and for the numpy reward. With

    pool = HostRewardPool()
    future = pool.submit(reward, images, prompts)   # returns at once
    next_batch = sample_jit(...)                     # device works meanwhile
    rewards = future.result()                        # np.float32 [B]

the copy (`jax.device_get`, which waits for the asynchronously dispatched computation
that produces `images`) and the reward both run in a worker thread, so the main thread is
free to dispatch the next jitted sampling call. Threads suffice because the work that
takes time releases Python's GIL (XLA's device wait and copy, Pillow's JPEG encoder).
Input shapes are checked in `submit` (no device sync); value checks (NaN, range) run in
the worker and re-raise from `result()`.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np

from alignjax.rewards.base import Reward, check_images, check_prompts, evaluate_reward

__all__ = ["HostRewardPool"]


class HostRewardPool:
  """A thread pool that evaluates rewards on the host; results are np.float32 [B].

  Use it as a context manager or call `close()`. Up to `max_workers` batches are scored at
  once; with the default 1, batches are scored one after another in submission order.
  """

  def __init__(self, max_workers: int = 1):
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
      raise ValueError(f"HostRewardPool: max_workers must be an integer >= 1; got {max_workers!r}.")
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix="alignjax-reward"
    )
    self._closed = False

  def submit(self, reward: Reward, images: Any, prompts: Any = None) -> concurrent.futures.Future:
    """Schedules `evaluate_reward(reward, images, prompts)` in a worker thread.

    Returns a `concurrent.futures.Future` at once; its `.result()` is np.float32 [B].
    `images` may be a jax array still being computed: the worker copies it to the host.
    """
    if self._closed:
      raise RuntimeError("HostRewardPool.submit called after close().")
    if not isinstance(reward, Reward):
      raise TypeError(f"HostRewardPool.submit expects a Reward; got {type(reward).__name__}.")
    label = f"reward {reward.name!r}"
    shape = check_images(images, label)  # static checks only: no wait on the device
    check_prompts(prompts, shape[0], label)
    return self._executor.submit(evaluate_reward, reward, images, prompts)

  def map(self, reward: Reward, batches: list[tuple[Any, Any]]) -> list[np.ndarray]:
    """Scores several (images, prompts) batches concurrently; returns their results in order."""
    futures = [self.submit(reward, images, prompts) for images, prompts in batches]
    return [future.result() for future in futures]

  def close(self, wait: bool = True) -> None:
    """Stops the workers (after finishing submitted work if `wait`)."""
    self._closed = True
    self._executor.shutdown(wait=wait)

  def __enter__(self) -> "HostRewardPool":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
