r"""Skinny float32 products x [M, K] . w [K, N]: the alignjax CPU kernel vs XLA:CPU's own.

  python -m benchmarks.skinny_matmul --threads=1             # w 768 x 2048, M = 1 .. 32
  python -m benchmarks.skinny_matmul --k=768 --n=32000       # an LM head

Both sides run in one jitted program each, compiled with the LM sampler's CPU decode options
(`sampling.CPU_DECODE_COMPILER_OPTIONS`: XLA's product is Eigen's), over `--copies` distinct
weight matrices (together larger than the last-level cache, so that every product reads its
weights from memory, as a decode step does). Time per product = best of `--repeats` program
runs / copies; weight bandwidth = K N 4 bytes / time. The kernel's results are checked against
XLA's (float32 rounding).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.lm_decode import pin_threads


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--k", type=int, default=768)
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--rows", default="1,2,4,8,16,32", help="comma-separated M values")
  parser.add_argument("--copies", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=6)
  parser.add_argument("--threads", type=int, default=None, help="cores (default: all allowed)")
  args = parser.parse_args()
  threads = pin_threads(args.threads)
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np

  from alignjax.kernels import skinny_matmul
  from alignjax.lm import sampling
  # pylint: enable=import-outside-toplevel

  ok, why = skinny_matmul.available()
  if not ok:
    raise SystemExit(f"the kernel is unavailable here: {why}")
  rng = np.random.default_rng(0)
  k, n = args.k, args.n
  ws = [
      jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k)) for _ in range(args.copies)
  ]
  print(
      f"x [M, {k}] . w [{k}, {n}] float32, {args.copies} weight copies "
      f"({args.copies * k * n * 4 / 1e6:.0f} MB), {threads} thread(s), jax {jax.__version__}"
  )
  print(
      f"{'M':>4s}{'kernel ms':>11s}{'XLA ms':>9s}{'kernel GB/s':>13s}{'XLA GB/s':>10s}"
      f"{'XLA / kernel':>14s}"
  )
  saved = skinny_matmul.MIN_ROWS, skinny_matmul.MAX_ROWS
  skinny_matmul.MIN_ROWS, skinny_matmul.MAX_ROWS = 1, 1 << 30  # measure every M

  def program(kernel: bool):
    def products(x, ws):
      with skinny_matmul.enabled(kernel):
        return jnp.stack([skinny_matmul.matmul(x, w) for w in ws])

    return jax.jit(products, compiler_options=sampling.CPU_DECODE_COMPILER_OPTIONS)

  try:
    for m in (int(r) for r in args.rows.split(",")):
      x = jnp.asarray(rng.standard_normal((m, k), np.float32))
      fns = {name: program(name == "kernel").lower(x, ws).compile() for name in ("kernel", "xla")}
      ys = {name: np.asarray(fn(x, ws)) for name, fn in fns.items()}
      np.testing.assert_allclose(ys["kernel"], ys["xla"], rtol=1e-4, atol=1e-4)
      best = {name: float("inf") for name in fns}
      for _ in range(args.repeats):  # interleaved
        for name, fn in fns.items():
          t0 = time.perf_counter()
          jax.block_until_ready(fn(x, ws))
          best[name] = min(best[name], (time.perf_counter() - t0) / args.copies)
      gbs = {name: k * n * 4 / t / 1e9 for name, t in best.items()}
      print(
          f"{m:4d}{best['kernel'] * 1e3:11.3f}{best['xla'] * 1e3:9.3f}{gbs['kernel']:13.2f}"
          f"{gbs['xla']:10.2f}{best['xla'] / best['kernel']:14.2f}"
      )
  finally:
    skinny_matmul.MIN_ROWS, skinny_matmul.MAX_ROWS = saved


if __name__ == "__main__":
  main()
