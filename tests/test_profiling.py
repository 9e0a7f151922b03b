"""alignjax.profiling: the per-op times of a traced XLA:CPU program."""

import re

import jax
import jax.numpy as jnp

from alignjax import profiling


def test_op_times_sums_the_ops_of_one_run_by_name():
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  rows, span = profiling.op_times(lambda: f(x).block_until_ready())
  assert span > 0 and rows
  names = [op for op, _, _ in rows]
  assert len(names) == len(set(names))  # one line per op name
  assert not any(re.search(r"\.\d+$", op) for op in names)  # instance numbers are removed
  assert any(("dot" in op) or ("fusion" in op) for op in names), names
  seconds = [t for _, t, _ in rows]
  assert seconds == sorted(seconds, reverse=True) and all(n >= 1 for _, _, n in rows)


def test_print_op_times_prints_the_top_ops_with_their_share(capsys):
  f = jax.jit(lambda x: jax.lax.map(lambda r: jnp.tanh(r @ x).sum(), x))
  x = jnp.ones((64, 64))
  f(x).block_until_ready()
  profiling.print_op_times(lambda: f(x).block_until_ready(), top=3)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("XLA ops of one run (") and 2 <= len(lines) <= 4
  assert all(re.search(r" s +\d+\.\d %  x\d+", line) for line in lines[1:])
  assert lines[1].split()[0] == "while" and lines[1].endswith("(container)")  # holds the rest
  assert not any("::" in line for line in lines)  # no runtime spans (ThunkExecutor::Execute)
