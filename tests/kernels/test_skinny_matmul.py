"""The skinny-matrix CPU kernel: exact against a float64 product, in the compiled program only
where it qualifies, and a clear fallback when it cannot be built."""

import os
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.kernels import skinny_matmul

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel is written for x86-64"
)


def require_kernel():
  ok, why = skinny_matmul.available()
  if not ok:
    pytest.skip(f"the skinny_matmul kernel is unavailable: {why}")


def require_compiler():
  compiler = os.environ.get("CXX") or "c++"
  if shutil.which(compiler) is None:
    pytest.skip(f"no C++ compiler {compiler!r} on PATH (set $CXX)")


@pytest.fixture
def fresh_availability():
  skinny_matmul.available.cache_clear()
  skinny_matmul._warn_once.cache_clear()  # pylint: disable=protected-access
  yield
  skinny_matmul.available.cache_clear()
  skinny_matmul._warn_once.cache_clear()  # pylint: disable=protected-access


@jax.jit
def kernel_product(x, w):
  with skinny_matmul.enabled():
    return skinny_matmul.matmul(x, w)


@pytest.mark.parametrize(
    "lead,k,n",
    [
        ((2,), 1, 1),
        ((3,), 17, 33),
        ((8,), 768, 2048),
        ((5,), 64, 4099),
        ((9,), 40, 100),
        ((16,), 7, 16),
        ((2, 3), 24, 30),
        ((2, 1), 130, 8),
        ((32,), 33, 71),
        ((8,), 16, 7),
    ],
)
def test_kernel_equals_the_float64_product(lead, k, n):
  require_kernel()
  rng = np.random.default_rng(k * n)
  x = rng.standard_normal(lead + (k,)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  assert skinny_matmul.qualifies(jnp.asarray(x), jnp.asarray(w)) is False  # outside the scope
  with skinny_matmul.enabled():
    assert skinny_matmul.qualifies(jnp.asarray(x), jnp.asarray(w))
  y = np.asarray(kernel_product(x, w))
  exact = x.astype(np.float64) @ w.astype(np.float64)
  assert y.shape == lead + (n,)
  # float32 rounding of k products: |error| <= k eps sum|x w| (a bound, not a tolerance guess)
  bound = k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w))
  assert (np.abs(y - exact) <= bound + 1e-30).all()


def test_the_kernel_is_compiled_in_only_where_it_qualifies():
  require_kernel()
  w = jnp.ones((32, 48), jnp.float32)

  def hlo(fn, x, w):
    return jax.jit(fn).lower(x, w).compile().as_text()

  def scoped(x, w):
    with skinny_matmul.enabled():
      return skinny_matmul.matmul(x, w)

  target = skinny_matmul.TARGET
  assert target in hlo(scoped, jnp.ones((4, 32)), w)
  assert target not in hlo(skinny_matmul.matmul, jnp.ones((4, 32)), w)  # no scope
  assert target not in hlo(scoped, jnp.ones((skinny_matmul.MAX_ROWS + 1, 32)), w)  # many rows
  assert target not in hlo(scoped, jnp.ones((1, 32)), w)  # one row: XLA's matrix-vector product
  assert target not in hlo(scoped, jnp.ones((4, 32), jnp.bfloat16), w.astype(jnp.bfloat16))
  with skinny_matmul.enabled(False):
    assert not skinny_matmul.qualifies(jnp.ones((4, 32)), w)


def test_programs_lowered_for_accelerators_use_the_plain_product():
  require_kernel()

  def scoped(x, w):
    with skinny_matmul.enabled():
      return skinny_matmul.matmul(x, w)

  traced = jax.jit(scoped).trace(jnp.ones((4, 32)), jnp.ones((32, 48)))
  for platforms, has_kernel in ((("cpu",), True), (("cuda",), False), (("tpu",), False)):
    text = traced.lower(lowering_platforms=platforms).as_text()
    assert (skinny_matmul.TARGET in text) == has_kernel, platforms


def test_without_a_compiler_the_product_falls_back_with_the_reason(
    fresh_availability, monkeypatch, tmp_path
):  # pylint: disable=redefined-outer-name,unused-argument
  monkeypatch.delenv("ALIGNJAX_DISABLE_KERNELS", raising=False)
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("ALIGNJAX_KERNEL_CACHE", str(tmp_path / "cache"))
  ok, why = skinny_matmul.available()
  assert not ok and "no-such-compiler" in why and "$CXX" in why
  x, w = jnp.ones((2, 3)), jnp.arange(12.0).reshape(3, 4)
  with skinny_matmul.enabled(), pytest.warns(UserWarning, match="no-such-compiler"):
    assert not skinny_matmul.qualifies(x, w)
  with skinny_matmul.enabled():
    np.testing.assert_array_equal(skinny_matmul.matmul(x, w), x @ w)
    np.testing.assert_array_equal(
        skinny_matmul.matmul(x, w, fallback=lambda a, b: -(a @ b)), -(x @ w)
    )


def test_a_failed_build_names_the_source_and_leaves_no_file(
    fresh_availability, monkeypatch, tmp_path
):  # pylint: disable=redefined-outer-name,unused-argument
  monkeypatch.delenv("ALIGNJAX_DISABLE_KERNELS", raising=False)
  require_compiler()
  bad = tmp_path / "broken.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.setattr(skinny_matmul, "SOURCE", str(bad))
  monkeypatch.setenv("ALIGNJAX_KERNEL_CACHE", str(tmp_path / "cache"))
  ok, why = skinny_matmul.available()
  assert not ok and "broken.cc" in why and "failed" in why
  assert os.listdir(tmp_path / "cache") == []


def test_disabled_by_environment(fresh_availability, monkeypatch):  # pylint: disable=redefined-outer-name,unused-argument
  monkeypatch.setenv("ALIGNJAX_DISABLE_KERNELS", "1")
  assert skinny_matmul.available() == (False, "ALIGNJAX_DISABLE_KERNELS is set")


def test_built_library_is_cached_and_reused(fresh_availability, monkeypatch, tmp_path):  # pylint: disable=redefined-outer-name,unused-argument
  monkeypatch.setenv("ALIGNJAX_KERNEL_CACHE", str(tmp_path))
  require_kernel()
  ok, path = skinny_matmul.available()
  assert ok and os.path.dirname(path) == str(tmp_path)
  assert os.listdir(tmp_path) == [os.path.basename(path)]
  stamp = os.stat(path).st_mtime_ns
  skinny_matmul.available.cache_clear()
  assert skinny_matmul.available() == (True, path)
  assert os.stat(path).st_mtime_ns == stamp


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"x \[..., K\] and w \[K, N\]"):
    skinny_matmul.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r"w \[K, N\]"):
    skinny_matmul.matmul(jnp.ones((2, 3)), jnp.ones((3, 4, 5)))
