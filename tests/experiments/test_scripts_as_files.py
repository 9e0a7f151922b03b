"""Every experiment script runs as a file (`python experiments/x.py`, from any directory, the
config given by an absolute path) as well as a module (`python -m experiments.x`, from the
checkout root): alignjax.scripts.make_importable puts the checkout root on sys.path, so the
scripts' and configs' imports of the `experiments` package resolve."""

import ast
import json
import os
import subprocess
import sys

import pytest

from alignjax import scripts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "experiments", "configs")

SCRIPTS = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d in (os.path.join(ROOT, "experiments"), os.path.join(ROOT, "experiments", "tables"))
    for f in os.listdir(d)
    if f.endswith(".py") and f not in ("__init__.py", "common.py", "lm_common.py")
)

# (script, its arguments with an invalid value, the error the script stops with). Each one loads
# its config (absolute path) and stops in its validation, before anything compiles: proof that
# the script's imports, and its config's, resolved. One script per way of importing the package:
# ddpo.py imports experiments.common, digits_flow.py (a config) imports experiments.configs,
# tilt_error.py sits in a subpackage.
INVALID_RUNS = [
    (
        "experiments/ddpo.py",
        [f"--config={CONFIGS}/ddpo/digits.py", "--config.num_rounds=0"],
        "config.num_rounds=0: must be > 0",
    ),
    (
        "experiments/lm_online.py",
        [f"--config={CONFIGS}/lm_online/arithmetic.py", "--config.num_samples=0"],
        "config.num_samples=0: must be > 0",
    ),
    (
        "experiments/pretrain_diffusion.py",
        [f"--config={CONFIGS}/pretrain_diffusion/digits_flow.py", "--config.train.steps=0"],
        "config.train.steps=0: must be > 0",
    ),
    ("experiments/tables/tilt_error.py", ["--seeds=0"], "seeds=0: must be >= 1"),
]


def test_every_script_makes_its_package_importable_before_importing_it():
  """Each script calls scripts.make_importable(__file__, __package__) at module level before
  its first import from `experiments` (the configs it loads may import the package too)."""
  assert len(SCRIPTS) >= 7, SCRIPTS
  for script in SCRIPTS:
    with open(os.path.join(ROOT, script)) as f:
      body = ast.parse(f.read()).body
    calls = [
        i
        for i, node in enumerate(body)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and ast.unparse(node.value) == "scripts.make_importable(__file__, __package__)"
    ]
    own = [
        i
        for i, node in enumerate(body)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "experiments"
    ]
    assert len(calls) == 1, script
    assert not own or calls[0] < min(own), script


def environment():
  """The test's environment without PYTHONPATH (nothing puts the checkout on the path but the
  script itself) and without the test session's fake devices (as a user runs it)."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def start(args, cwd, workdir):
  return subprocess.Popen(
      [sys.executable, *args, f"--workdir={workdir}"],
      cwd=cwd,
      env=environment(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )


def finish(process, timeout=240):
  out, _ = process.communicate(timeout=timeout)
  return process.returncode, out


def test_package_root_is_above_the_package_chain():
  assert scripts.package_root(os.path.join(ROOT, "experiments", "ddpo.py")) == ROOT
  assert scripts.package_root(os.path.join(ROOT, "experiments", "tables", "tilt_error.py")) == ROOT


def test_make_importable_changes_nothing_for_a_module(monkeypatch):
  monkeypatch.setattr(sys, "path", list(sys.path))
  before = list(sys.path)
  assert (
      scripts.make_importable(os.path.join(ROOT, "experiments", "ddpo.py"), "experiments") is None
  )
  assert sys.path == before


def test_make_importable_puts_the_root_in_place_of_the_script_directory(monkeypatch):
  script_dir = os.path.join(ROOT, "experiments", "tables")
  monkeypatch.setattr(sys, "path", [script_dir, "/elsewhere", ROOT])
  assert scripts.make_importable(os.path.join(script_dir, "tilt_error.py"), None) == ROOT
  assert sys.path == [ROOT, "/elsewhere"]


@pytest.mark.slow
def test_every_script_runs_as_a_file_from_elsewhere_and_as_a_module(tmp_path):
  """One real tiny run (pretrain_lm, 2 steps) as a file from a directory outside the checkout,
  and scripts as files up to their config validation, all started at once; plus the validation
  of a script importing `experiments` run as a module from the root."""
  real = start(
      [
          os.path.join(ROOT, "experiments", "pretrain_lm.py"),
          f"--config={CONFIGS}/pretrain_lm/tiny.py:smoke=True",
          "--config.train.steps=2",
          "--config.train.log_every=1",
          "--config.eval.num_examples=2",
          "--config.eval.batch_size=2",
      ],
      cwd=tmp_path,
      workdir=tmp_path / "lm",
  )
  invalid = [
      start([os.path.join(ROOT, script), *args], tmp_path, tmp_path / str(i))
      for i, (script, args, _) in enumerate(INVALID_RUNS)
  ]
  as_module = start(
      [
          "-m",
          "experiments.draft",
          "--config=experiments/configs/draft/digits.py:variant=lv",
          "--config.num_updates=0",
      ],
      cwd=ROOT,
      workdir=tmp_path / "module",
  )
  for process, (script, _, error) in zip(invalid, INVALID_RUNS):
    rc, out = finish(process)
    assert rc != 0 and error in out and "ModuleNotFoundError" not in out, (script, out[-3000:])
  rc, out = finish(as_module)
  assert rc != 0 and "config.num_updates=0" in out and "ModuleNotFoundError" not in out, out
  rc, out = finish(real)
  assert rc == 0, out[-3000:]
  with open(tmp_path / "lm" / "report.json") as f:
    report = json.load(f)
  assert "test_accuracy" in report
  assert os.path.exists(tmp_path / "lm" / "model" / "model.safetensors")
