"""Skinny float32 matrix products on CPU: a hand-written XLA FFI kernel for LM decoding.

    y[..., n] = sum_k x[..., k] w[k, n]        x [..., K] (few rows), w [K, N]        (eq. 1)

A decode step multiplies B rows (the batch, a few) by every weight matrix once. On CPU that is
bound by reading the weights from memory, and XLA:CPU's matrix products (Eigen, or YNNPACK
fusions) stream them at well under the memory bandwidth for so few rows (they pack the weights
into blocks first, which pays off only for many rows). `skinny_matmul.cc` reads the weights
from memory once, without packing them (its header says how), and splits the columns between
XLA's intra-op threads.

Measured (`python -m benchmarks.skinny_matmul --threads=T`, 2-core AMD EPYC, w 768 x 2048
float32, weights read from memory; time of XLA:CPU's (Eigen) product / the kernel's):

    rows M          1     2     4     8    16    32
    1 thread     0.74  1.28  1.55  1.62  1.52  1.27
    2 threads    0.70  2.11  1.89  1.88  1.27  1.83

(8 rows, 1 thread: 7.5 GB/s of weights against 4.6; an LM head 768 x 32000: 2.15x). One row
is a matrix-vector product, which XLA streams faster, hence MIN_ROWS = 2 and MAX_ROWS = 32.

Use: `matmul(x, w)` anywhere; it calls the kernel inside an `enabled()` scope when the kernel is
available and the product qualifies (float32, `MIN_ROWS` to `MAX_ROWS` rows), and its `fallback`
(default `jnp.dot`) otherwise; a program lowered for another platform than the CPU gets `jnp.dot`
(`jax.lax.platform_dependent`). Like `jax.default_matmul_precision`, the scope is read while
tracing, so a jitted function should enter it inside its own body (as `alignjax.lm.sampling`
does for its CPU decode loop), never around a call of a jitted function that is also used
outside it. The kernel has no derivative: use it for inference.

The kernel is C++ compiled on first use with the system's C++ compiler (`$CXX`, else c++) into
`$ALIGNJAX_KERNEL_CACHE` (default ~/.cache/alignjax/kernels), keyed by a hash of its source,
flags and the jax version, and loaded from there afterwards. Without a compiler, on a CPU
without AVX2/FMA, or with ALIGNJAX_DISABLE_KERNELS=1, `available()` says why and `matmul` is
`jnp.dot`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

__all__ = ["MAX_ROWS", "MIN_ROWS", "TARGET", "available", "enabled", "matmul", "qualifies"]

TARGET = "alignjax_skinny_matmul_f32"
MIN_ROWS, MAX_ROWS = 2, 32  # where the kernel beats XLA:CPU's product (module docstring)
SOURCE = os.path.join(os.path.dirname(__file__), "skinny_matmul.cc")
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC")

_scope = contextvars.ContextVar("alignjax_skinny_matmul", default=False)
_registered: list[str] = []  # XLA keeps one handler per target name for the process


def cache_dir() -> str:
  return os.environ.get("ALIGNJAX_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "alignjax", "kernels"
  )


def _build(compiler: str) -> str:
  """Path of the compiled kernel library, compiling it (atomically) when not cached."""
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(
      source + " ".join((compiler,) + FLAGS).encode() + jax.__version__.encode()
  ).hexdigest()[:16]
  path = os.path.join(cache_dir(), f"skinny_matmul-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(cache_dir(), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
    os.replace(tmp, path)  # another process may have won the race: same bytes
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
  """(True, library path) once the kernel is compiled, loaded and registered with XLA:CPU,
  else (False, why not). Computed once per process."""
  if os.environ.get("ALIGNJAX_DISABLE_KERNELS", "") not in ("", "0"):
    return False, "ALIGNJAX_DISABLE_KERNELS is set"
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False, f"the kernel is written for x86-64 (AVX2); this machine is {platform.machine()}"
  compiler = os.environ.get("CXX") or "c++"
  if shutil.which(compiler) is None:
    return False, f"no C++ compiler {compiler!r} on PATH (set $CXX)"
  try:
    path = _build(compiler)
    lib = ctypes.cdll.LoadLibrary(path)
    if not lib.AlignjaxSkinnyMatmulCpuSupported():
      return False, "this CPU lacks AVX2/FMA"
    if not _registered:
      jax.ffi.register_ffi_target(
          TARGET, jax.ffi.pycapsule(lib.AlignjaxSkinnyMatmulF32), platform="cpu"
      )
      _registered.append(path)
  except (OSError, RuntimeError) as e:
    return False, str(e)
  return True, path


@contextlib.contextmanager
def enabled(on: bool = True):
  """Scope in which `matmul` uses the kernel (read at trace time; see module docstring)."""
  token = _scope.set(on)
  try:
    yield
  finally:
    _scope.reset(token)


def qualifies(x, w) -> bool:
  """Whether `matmul(x, w)` calls the kernel here: in an `enabled()` scope, kernel available,
  float32 operands, w a non-empty matrix, MIN_ROWS to MAX_ROWS rows of x."""
  if not _scope.get() or w.ndim != 2 or 0 in w.shape:
    return False
  if x.dtype != jnp.float32 or w.dtype != jnp.float32:
    return False
  rows = 1
  for d in x.shape[:-1]:
    rows *= d
  if not MIN_ROWS <= rows <= MAX_ROWS:
    return False
  ok, why = available()
  if not ok:
    _warn_once(why)
  return ok


@functools.lru_cache(maxsize=None)
def _warn_once(why: str):
  warnings.warn(f"alignjax skinny_matmul kernel unavailable, using jnp.dot: {why}", stacklevel=3)


def matmul(x, w, fallback=jnp.dot):
  """Eq. 1: x [..., K] . w [K, N] -> [..., N]: the kernel when `qualifies`, else
  `fallback(x, w)` (a caller's own form of the same product, e.g. a tensordot)."""
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"skinny_matmul.matmul: need x [..., K] and w [K, N], got {x.shape} and " f"{w.shape}"
    )
  if not qualifies(x, w):
    return fallback(x, w)
  k, n = w.shape
  lead = x.shape[:-1]
  kernel = jax.ffi.ffi_call(
      TARGET, jax.ShapeDtypeStruct((x.size // k, n), jnp.float32), vmap_method="sequential"
  )
  y = jax.lax.platform_dependent(x.reshape(-1, k), w, cpu=kernel, default=jnp.dot)
  return y.reshape(*lead, n)
