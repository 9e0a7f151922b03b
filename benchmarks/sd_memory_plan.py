r"""Memory plan of the full-size Stable Diffusion 1.5 training steps on an 8-device mesh.

  python -m benchmarks.sd_memory_plan                         # every row (slow: see below)
  python -m benchmarks.sd_memory_plan --algorithms=draft --meshes=8x1 --finetune=lora

Compiles (does not run) one training step of each algorithm's SD 1.5 config
(experiments/configs/{ddpo,draft,adjoint_matching}/sd15.py; alignjax.diffusion.full_size) for
8 fake CPU devices arranged as data x fsdp meshes, with LoRA and full fine-tuning, bfloat16
compute over float32 master weights, with and without per-block remat of the UNet, and prints
the per-device bytes of XLA's memory analysis of the compiled program: arguments (the sharded
train state, frozen weights and the batch), outputs, temporaries, and their peak estimate
arguments + outputs + temporaries − aliased (the donated state's buffers are reused). The
verdict columns say whether that fits in 16 GB (TPU v4/v5e, per chip) and 80 GB (A100/H100 80
GB) per device. XLA:CPU plans memory as the GPU and TPU compilers do at this level (the same
sharded program), but their fusion and rematerialisation passes differ: read the table as the
order of magnitude and the ratios between rows, and keep a margin.

Each row compiles in 70-430 s on the 2-core development CPU (the default's 24 rows: about an
hour; select rows with the flags). The measured table is in the configs' docstrings.

Batch sizes are the configs' per-step global batch: DDPO trains 256 trajectories × 50 steps
per epoch in 2 minibatches of 200 microbatches (the memory is that of one microbatch's
gradient, spread over the data axes; the trajectory is an argument); DRaFT and Adjoint Matching 16 prompts per step.
"""

from __future__ import annotations

import os
import sys
import time

if "jax" not in sys.modules:  # 8 fake devices, before jax is imported
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags

import jax

from alignjax import parallel
from alignjax.diffusion import full_size
from experiments.configs.adjoint_matching import sd15 as am_sd15
from experiments.configs.ddpo import sd15 as ddpo_sd15
from experiments.configs.draft import sd15 as draft_sd15

CONFIGS = {
    "ddpo": (ddpo_sd15, "reward=aesthetic"),
    "draft": (draft_sd15, "variant=k10"),
    "am": (am_sd15, "reward=aesthetic"),
}
GB = 1e9

_ALGORITHMS = flags.DEFINE_list("algorithms", list(CONFIGS), "Steps to compile.")
_MESHES = flags.DEFINE_list("meshes", ["8x1", "1x8"], "data x fsdp meshes of the 8 devices.")
_FINETUNE = flags.DEFINE_list("finetune", ["lora", "full"], "Fine-tuning modes.")
_REMAT = flags.DEFINE_list("remat", ["true", "false"], "UNet per-block remat settings.")


def parse_mesh(text: str) -> dict:
  try:
    data, fsdp = (int(v) for v in text.split("x"))
  except ValueError:
    raise app.UsageError(f"mesh {text!r}: expected DATAxFSDP, e.g. 8x1 or 2x4") from None
  if data * fsdp != jax.device_count():
    raise app.UsageError(f"mesh {text!r} has {data * fsdp} devices; there are {jax.device_count()}")
  return dict(data=data, fsdp=fsdp, tensor=1)


def memory_row(algorithm: str, mesh_text: str, finetune: str, remat: bool) -> dict:
  module, arg = CONFIGS[algorithm]
  config = module.get_config(f"{arg},finetune={finetune}")
  config.model.remat = remat
  config.mesh = parse_mesh(mesh_text)
  mesh = parallel.make_mesh(config.mesh)
  start = time.perf_counter()
  compiled = full_size.step(algorithm, config, mesh).lower(mesh).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  peak = args + out + temp - m.alias_size_in_bytes
  return dict(args=args, out=out, temp=temp, peak=peak, seconds=seconds)


def main(argv):
  del argv
  unknown = sorted(set(_ALGORITHMS.value) - set(CONFIGS))
  if unknown:
    raise app.UsageError(f"algorithm(s) {unknown}: valid choices are {list(CONFIGS)}")
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices; per-device GB")
  header = (
      f"{'step':<6} {'mesh':<5} {'finetune':<8} {'remat':<5} "
      f"{'args':>7} {'out':>7} {'temp':>8} {'peak':>8}  16GB 80GB  compile"
  )
  print(header)
  for algorithm in _ALGORITHMS.value:
    for mesh_text in _MESHES.value:
      for finetune in _FINETUNE.value:
        for remat_text in _REMAT.value:
          remat = remat_text.lower() in ("1", "true", "yes")
          r = memory_row(algorithm, mesh_text, finetune, remat)
          fits = lambda limit: "yes " if r["peak"] <= limit * GB else "no  "
          print(
              f"{algorithm:<6} {mesh_text:<5} {finetune:<8} {str(remat):<5} "
              f"{r['args'] / GB:7.2f} {r['out'] / GB:7.2f} {r['temp'] / GB:8.2f} "
              f"{r['peak'] / GB:8.2f}  {fits(16)} {fits(80)} {r['seconds']:6.0f} s",
              flush=True,
          )


if __name__ == "__main__":
  app.run(main)
