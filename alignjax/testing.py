"""Tiny models for tests and colabs: a few channels, random weights, built in milliseconds.

The tiny models are initialised on the host with numpy rather than with the modules' own
JAX initialisers: building them then costs no XLA compilation (on a small CPU, compiling the
dozens of per-parameter random initialisers takes far longer than the tests that use them).
The host initialisation is deterministic in `seed` and keeps every tensor non-trivial:

    kernel     ~ N(0, 1 / fan_in),  fan_in = prod(shape[:-1])   (LeCun normal, untruncated)
    embedding  ~ N(0, 1)
    bias       ~ N(0, 0.1^2)          scale ~ 1 + N(0, 0.1^2)    (norm layers)
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from alignjax.models.classifier import ClassifierConfig, DigitsClassifier
from alignjax.models.unet import UNet, UNetConfig
from alignjax.parallel import path_str

# A one-level UNet (no down/up-sampling, fewest layers: cheapest to compile) with
# self-attention in the mid block; TWO_LEVEL_UNET_CONFIG adds the 8 -> 4 level. The output
# conv is random (not zero) so that eps predictions, samples and gradients are non-trivial.
TINY_UNET_CONFIG = UNetConfig(
    channels=(8,),
    num_res_blocks=1,
    attention_resolutions=(),
    num_heads=2,
    num_groups=4,
    embed_dim=16,
    time_freq_dim=8,
    zero_init_output=False,
)
TWO_LEVEL_UNET_CONFIG = dataclasses.replace(TINY_UNET_CONFIG, channels=(8, 16))
TINY_CLASSIFIER_CONFIG = ClassifierConfig(channels=(8, 8), hidden_dim=16, num_groups=4)


def host_init(build, seed: int = 0) -> nnx.Module:
  """`build(rngs)` (an NNX module) with parameters drawn on the host (module docstring).

  Example: `host_init(lambda rngs: UNet(config, rngs=rngs), seed=0)`.
  """
  abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path_str(path), tuple(leaf.shape)
    last = name.rsplit("/", 1)[-1]
    if last == "kernel":
      value = rng.normal(size=shape) / math.sqrt(max(1, math.prod(shape[:-1])))
    elif last == "embedding":
      value = rng.normal(size=shape)
    elif last == "scale":
      value = 1.0 + 0.1 * rng.normal(size=shape)
    elif last == "bias":
      value = 0.1 * rng.normal(size=shape)
    else:
      raise ValueError(
          f"host_init: no rule for parameter {name!r} (kernel, embedding, " "scale or bias)"
      )
    return jnp.asarray(value, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def tiny_unet(seed: int = 0, config: UNetConfig = TINY_UNET_CONFIG) -> UNet:
  """A random tiny class-conditional UNet for 8x8x1 inputs (about 9k parameters)."""
  return host_init(lambda rngs: UNet(config, rngs=rngs), seed)


def tiny_classifier(
    seed: int = 0, config: ClassifierConfig = TINY_CLASSIFIER_CONFIG
) -> DigitsClassifier:
  """A random tiny digits classifier: images [B, 8, 8, 1] in [0, 1] -> logits [B, 10]."""
  return host_init(lambda rngs: DigitsClassifier(config, rngs=rngs), seed)


def free_port() -> int:
  """A free TCP port on 127.0.0.1, for a local `jax.distributed` coordinator."""
  import socket

  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_local_processes(
    script,
    args_per_process,
    *,
    devices_per_process: int = 2,
    timeout: float = 150.0,
    pythonpath: str | None = None,
) -> list[dict]:
  """Runs one Python `script` per entry of `args_per_process` at once (a local multi-host job).

  Each child gets `devices_per_process` fake CPU devices and must print one line
  "RESULT <json>"; the parsed JSON of every child is returned in process order. A child
  that fails or hangs fails the call with its output; none is left running.
  """
  import json
  import os
  import subprocess
  import sys

  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
  )
  if pythonpath:
    env["PYTHONPATH"] = pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")
  procs = [
      subprocess.Popen(
          [sys.executable, str(script), *map(str, args)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for args in args_per_process
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for p, (out, err) in zip(procs, outputs):
    if p.returncode != 0:
      raise AssertionError(f"child failed:\n{out}\n{err[-3000:]}")
  # The JSON is decoded up to its end: native libraries (Gloo) share the child's stdout and may
  # write onto the same line between `print`'s text and its newline.
  decoder = json.JSONDecoder()
  results = []
  for out, err in outputs:
    line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
      raise AssertionError(f"child printed no RESULT line:\n{out}\n{err[-3000:]}")
    results.append(decoder.raw_decode(line[len("RESULT ") :])[0])
  return results


def assert_lora_trained(trained, initial, adam_steps: int, learning_rate: float) -> None:
  """Asserts that LoRA factors {name: {"a", "b"}} moved from their initial values as training
  must move them: B starts at zero and is non-zero after training, A moved, and no factor
  moved further than Adam can in `adam_steps` steps (|m̂/√v̂| <= 1.0014 for the first two
  steps, 1.5 of margin) — which also shows `initial` are the factors training started from (a
  fresh A is drawn on the scale 1/√fan_in, far from that bound)."""
  assert trained.keys() == initial.keys()
  bound = 1.5 * adam_steps * learning_rate
  for name, factors in trained.items():
    a, b = np.asarray(factors["a"]), np.asarray(factors["b"])
    a0, b0 = np.asarray(initial[name]["a"]), np.asarray(initial[name]["b"])
    assert a.shape == a0.shape and b.shape == b0.shape and not b0.any(), name
    assert b.any(), f"{name}: B is still zero, as initialised"
    assert 0 < np.abs(a - a0).max() <= bound, (name, np.abs(a - a0).max(), bound)
    assert np.abs(b).max() <= bound, name


def flip_saved_array_bytes(step_dir, count: int = 64) -> tuple[str, str]:
  """XORs `count` bytes in the middle of the largest array chunk a restore of the step reads.

  An Orbax step's OCDBT data files also hold bytes that a restore never reads (each
  process's own B-tree nodes, superseded once the per-process trees are merged), so
  flipping bytes at a fixed file offset may hit nothing. The bytes are found through the
  merged tree instead: the largest chunk stored out of line, or, when every chunk is small
  enough to sit inline in the tree (a sharded tiny model), the largest tree node, whose
  entries are those chunks. Returns the damaged file and what was hit.
  """
  state_dir = os.path.join(os.fspath(step_dir), "train_state")
  base = ts.KvStore.open("file://" + os.path.abspath(state_dir) + "/").result()

  def byte_range(location):  # "value:<prefix>:<file>:<offset>:<length>", same for nodes
    where, offset, length = location.split(":", 1)[1].rsplit(":", 2)
    prefix, path = where.rsplit(":", 1)
    return int(length), os.path.join(state_dir, prefix, path), int(offset)

  root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
  chunks, nodes, pending = [], [], [root]
  while pending:
    node = pending.pop()
    nodes.append((*byte_range(node), f"tree node {node}"))
    for entry in ts.ocdbt.dump(base, node).result()["entries"]:
      location = str(entry.get("indirect_value") or entry.get("node") or "")
      if location.startswith("btreenode:"):
        pending.append(location)
      elif location.startswith("value:"):
        chunks.append((*byte_range(location), f"chunk {entry['key']!r}"))
  length, path, offset, what = max(chunks or nodes, key=lambda c: c[0])
  start = offset + max(0, length - count) // 2
  with open(path, "r+b") as f:
    f.seek(start)
    data = f.read(min(count, length))
    f.seek(start)
    f.write(bytes(b ^ 0xFF for b in data))
  return path, what
