"""Tests for alignjax.rewards.host: HostRewardPool runs rewards off the main thread."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.rewards import HostRewardPool, Reward, brightness, jpeg_compressibility

IMAGES = np.random.default_rng(0).random((6, 8, 8, 1)).astype(np.float32)
TIMEOUT = 30


def test_results_match_direct_call():
  reward = jpeg_compressibility(upscale=4)
  expected = reward(IMAGES)
  device_images = jax.jit(lambda x: jnp.clip(x * 1.0, 0, 1))(IMAGES)
  with HostRewardPool(max_workers=2) as pool:
    futures = [pool.submit(reward, device_images, jnp.arange(6)), pool.submit(reward, IMAGES)]
    diff = pool.submit(brightness(), device_images)
    for future in futures:
      out = future.result(TIMEOUT)
      assert isinstance(out, np.ndarray) and out.dtype == np.float32
      np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(diff.result(TIMEOUT), IMAGES.mean(axis=(1, 2, 3)), rtol=1e-6)
    halves = pool.map(reward, [(IMAGES[:3], None), (IMAGES[3:], np.arange(3))])
  np.testing.assert_array_equal(np.concatenate(halves), expected)


def test_submit_returns_before_the_work_is_done(monkeypatch):
  release = threading.Event()
  threads = {}
  real_device_get = jax.device_get

  def recording_device_get(tree):
    threads.setdefault("device_get", threading.current_thread())
    return real_device_get(tree)

  def slow_mean(images, prompts):
    threads["reward"] = threading.current_thread()
    assert release.wait(TIMEOUT), "test never released the worker"
    return images.mean(axis=(1, 2, 3))

  monkeypatch.setattr(jax, "device_get", recording_device_get)
  slow = Reward("slow_mean", slow_mean, False)
  with HostRewardPool() as pool:
    future = pool.submit(slow, jnp.asarray(IMAGES), np.arange(6))
    assert not future.done()
    # The main thread is free: it can run device work while the reward waits.
    np.testing.assert_allclose(jax.jit(jnp.sum)(IMAGES), IMAGES.sum(), rtol=1e-5)
    assert not future.done()
    release.set()
    out = future.result(TIMEOUT)
  np.testing.assert_allclose(out, IMAGES.mean(axis=(1, 2, 3)), rtol=1e-6)
  assert threads["device_get"] is not threading.main_thread()
  assert threads["reward"] is not threading.main_thread()


def test_errors():
  reward = jpeg_compressibility()
  pool = HostRewardPool()
  bad = IMAGES.copy()
  bad[2, 1, 1, 0] = np.nan
  future = pool.submit(reward, bad)  # value checks run in the worker ...
  with pytest.raises(ValueError, match="NaN"):
    future.result(TIMEOUT)  # ... and re-raise here
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):  # layout checks run at once
    pool.submit(reward, IMAGES[0])
  with pytest.raises(ValueError, match="batch length 5"):
    pool.submit(reward, IMAGES, np.arange(5))
  with pytest.raises(TypeError, match="expects a Reward"):
    pool.submit(lambda images, prompts: images, IMAGES)
  pool.close()
  with pytest.raises(RuntimeError, match="after close"):
    pool.submit(reward, IMAGES)
  with pytest.raises(ValueError, match="max_workers must be an integer >= 1"):
    HostRewardPool(max_workers=0)
