"""Tests for alignjax.configs: validators, mesh/batch checks, parse_arg, absl overrides."""

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from alignjax import configs
from alignjax.configs import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_FILE = textwrap.dedent("""
    import ml_collections

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.batch_size = 8
        c.lr = 1e-3
        c.ddpo = ml_collections.ConfigDict({"num_epochs": 2, "clip": 0.1})
        return c
""")


def make_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.lr = 1e-3
  c.sampler = "ddim"
  c.ddpo = ml_collections.ConfigDict(
      {"batch_size": -4, "clip": 1e-4, "eta": 1.0, "weight": 0.0, "flag": True, "name": "x"}
  )
  return c


# --------------------------------------------------------------------------- validators
def test_check_positive_and_nonnegative_messages():
  c = make_config()
  configs.check_positive(c, "lr", "ddpo.clip")
  with pytest.raises(ConfigError) as info:
    configs.check_positive(c, "lr", "ddpo.batch_size")
  assert str(info.value) == "config.ddpo.batch_size=-4: must be > 0"
  configs.check_nonnegative(c, "seed", "ddpo.weight")
  with pytest.raises(ConfigError, match=r"^config.ddpo.batch_size=-4: must be >= 0$"):
    configs.check_nonnegative(c, "ddpo.batch_size")
  with pytest.raises(ConfigError, match="config.ddpo.weight=0.0: must be > 0"):
    configs.check_positive(c, "ddpo.weight")
  with pytest.raises(ConfigError, match="config.sampler='ddim': must be a number, got str"):
    configs.check_positive(c, "sampler")
  with pytest.raises(ConfigError, match="must be a number, got bool"):
    configs.check_positive(c, "ddpo.flag")
  c.lr = float("nan")
  with pytest.raises(ConfigError, match="not NaN"):
    configs.check_positive(c, "lr")


def test_missing_key_suggests_close_matches():
  c = make_config()
  with pytest.raises(ConfigError) as info:
    configs.check_positive(c, "ddpo.bach_size")
  msg = str(info.value)
  assert "config.ddpo.bach_size: missing key 'bach_size'" in msg
  assert "did you mean 'batch_size'?" in msg
  assert "valid keys in config.ddpo: batch_size, clip, eta, flag, name, weight" in msg
  with pytest.raises(ConfigError, match="config.lr is a float, not a section"):
    configs.get_field(c, "lr.x")
  assert configs.get_field({"a": {"b": 3}}, "a.b") == 3


def test_check_choice_fraction_range_integer_divisible():
  c = make_config()
  configs.check_choice(c, "sampler", ("ddim", "ddpm"))
  with pytest.raises(ConfigError, match="config.sampler='ddim': must be one of 'ddpm', 'euler'"):
    configs.check_choice(c, "sampler", ["ddpm", "euler"])
  configs.check_fraction(c, "ddpo.eta")
  configs.check_fraction(c, "ddpo.weight")
  with pytest.raises(ConfigError, match=r"config.ddpo.eta=1.0: must lie in \[0.0, 1.0\)"):
    configs.check_fraction(c, "ddpo.eta", inclusive=(True, False))
  with pytest.raises(ConfigError, match=r"config.ddpo.weight=0.0: must lie in \(0.0, 1.0\]"):
    configs.check_fraction(c, "ddpo.weight", inclusive=(False, True))
  with pytest.raises(ConfigError, match=r"must lie in \[2, 5\]"):
    configs.check_range(c, "ddpo.eta", 2, 5)
  configs.check_integer(c, "seed", "ddpo.batch_size")
  with pytest.raises(ConfigError, match="config.lr=0.001: must be an int, got float"):
    configs.check_integer(c, "lr")
  c.ddpo.batch_size = 12
  configs.check_divisible(c, "ddpo.batch_size", 4)
  with pytest.raises(
      ConfigError, match=r"config.ddpo.batch_size=12: must be divisible by 8 " r"\(devices\)"
  ):
    configs.check_divisible(c, "ddpo.batch_size", 8, "devices")


# --------------------------------------------------------------------------- mesh and batch
@pytest.mark.parametrize(
    "mesh, n, expected",
    [
        ({"data": -1}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
        ({"fsdp": -1, "tensor": 2}, 8, {"data": 1, "fsdp": 4, "tensor": 2}),
        ({"data": 2, "fsdp": 2, "tensor": 1}, 4, {"data": 2, "fsdp": 2, "tensor": 1}),
        ({}, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ],
)
def test_resolve_mesh_shape(mesh, n, expected):
  assert configs.resolve_mesh_shape(mesh, n) == expected
  assert configs.resolve_mesh_shape(ml_collections.ConfigDict(mesh), n) == expected


def test_check_mesh_and_batch():
  sizes = configs.check_mesh_and_batch(
      {"data": -1, "fsdp": 2}, 8, {"ddpo.batch_size": 16, "ddpo.train_batch_size": 8}
  )
  assert sizes == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ConfigError) as info:
    configs.check_mesh_and_batch({"data": 4, "fsdp": 2}, 8, {"ddpo.batch_size": 12})
  assert str(info.value) == (
      "config.ddpo.batch_size=12: must be divisible by data*fsdp=8 (the batch is split "
      "over mesh data=4 x fsdp=2 on 8 devices)"
  )
  # tensor parallelism does not split the batch
  configs.check_mesh_and_batch({"data": 2, "tensor": 4}, 8, {"b": 2})
  with pytest.raises(ConfigError, match="config.b=0: must be an int > 0"):
    configs.check_mesh_and_batch({"data": -1}, 8, {"b": 0})
  with pytest.raises(ConfigError, match="config.b=2: must be divisible by the 4 processes"):
    configs.check_mesh_and_batch({"data": 1, "tensor": -1}, 8, {"b": 2}, num_processes=4)
  with pytest.raises(
      ConfigError,
      match=r"config.mesh \(data=3, fsdp=1, tensor=1\) has 3 "
      r"devices but 8 devices are available",
  ):
    configs.check_mesh_and_batch({"data": 3}, 8, {"b": 3})


# --------------------------------------------------------------------------- parse_arg
def test_parse_arg_types_and_errors():
  c = configs.parse_arg(
      "steps=10,lr=0.5,name=big,fast,dims=(1, 2)",
      steps=1,
      lr=1.0,
      name="small",
      fast=False,
      dims=(4,),
      variant=None,
  )
  assert isinstance(c, ml_collections.ConfigDict)
  assert c.to_dict() == {
      "steps": 10,
      "lr": 0.5,
      "name": "big",
      "fast": True,
      "dims": (1, 2),
      "variant": None,
  }
  assert type(c.steps) is int and type(c.lr) is float
  assert configs.parse_arg(None, a=1).a == 1 and configs.parse_arg("", a=1).a == 1
  assert configs.parse_arg("fast=no", fast=True).fast is False
  assert configs.parse_arg("variant=x", variant=None).variant == "x"
  with pytest.raises(
      ConfigError,
      match="arg 'stpes' in 'stpes=3' is unknown; did you mean "
      "'steps'\\? valid keys in arg: lr, steps",
  ):
    configs.parse_arg("stpes=3", steps=1, lr=1.0)
  with pytest.raises(ConfigError, match="arg steps='x': cannot parse as int"):
    configs.parse_arg("steps=x", steps=1)
  with pytest.raises(ConfigError, match="arg fast='maybe': cannot parse as bool"):
    configs.parse_arg("fast=maybe", fast=False)
  with pytest.raises(ConfigError, match="'steps' needs a value"):
    configs.parse_arg("steps", steps=1)


# --------------------------------------------------------------------------- absl overrides
def _flag_values(tmp_path, *overrides):
  """A fresh FlagValues with a locked config flag, and the argv that sets it."""
  path = tmp_path / "cfg.py"
  path.write_text(CONFIG_FILE)
  argv = ["prog", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
  return fv, argv


def test_wrong_type_override_message_comes_from_ml_collections(tmp_path):
  fv, argv = _flag_values(tmp_path, "--config.batch_size=abc")
  with pytest.raises(flags.IllegalFlagValueError) as info:
    configs.parse_config_flags(argv, flag_values=fv)
  # ml_collections already names the key and the value: we rely on it
  assert str(info.value) == (
      "flag --config.batch_size=abc: invalid literal for int() " "with base 10: 'abc'"
  )


def test_mistyped_override_key_gets_clear_message(tmp_path):
  # without the helper: an escaped AttributeError that lists no valid keys
  fv, argv = _flag_values(tmp_path, "--config.bach_size=4")
  with pytest.raises(AttributeError) as raw:
    fv(argv)
  assert "valid keys" not in str(raw.value)
  fv, argv = _flag_values(tmp_path, "--config.bach_size=4")
  with pytest.raises(ConfigError) as info:
    configs.parse_config_flags(argv, flag_values=fv)
  assert str(info.value) == (
      "unknown config key 'bach_size' in --config.bach_size=4: did "
      "you mean 'batch_size'? valid keys in config: batch_size, "
      "ddpo, lr"
  )
  fv, argv = _flag_values(tmp_path, "--config.ddpo.zzz=3")
  with pytest.raises(
      ConfigError,
      match="unknown config key 'zzz' in --config.ddpo.zzz=3: "
      "valid keys in config.ddpo: clip, num_epochs$",
  ):
    configs.parse_config_flags(argv, flag_values=fv)
  fv, argv = _flag_values(tmp_path, "--config.lr.x=3")
  with pytest.raises(ConfigError, match="config.lr is a float, not a section"):
    configs.parse_config_flags(argv, flag_values=fv)
  fv, argv = _flag_values(tmp_path, "--config.ddpo.clip=0.3")  # a good override
  configs.parse_config_flags(argv, flag_values=fv)
  assert fv.config.ddpo.clip == 0.3


def test_flags_parser_in_absl_script_exits_with_message(tmp_path):
  (tmp_path / "cfg.py").write_text(CONFIG_FILE)
  script = tmp_path / "main.py"
  script.write_text(textwrap.dedent("""
        from absl import app
        from ml_collections import config_flags
        from alignjax import configs

        _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)

        def main(argv):
            print("batch_size", _CONFIG.value.batch_size)

        app.run(main, flags_parser=configs.flags_parser)
    """))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def run(*args):
    return subprocess.run(
        [sys.executable, str(script), f"--config={tmp_path}/cfg.py", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

  ok = run("--config.batch_size=4")
  assert ok.returncode == 0 and "batch_size 4" in ok.stdout
  bad = run("--config.bach_size=4")
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert (
      "FATAL Flags parsing error: unknown config key 'bach_size' in "
      "--config.bach_size=4: did you mean 'batch_size'?"
  ) in bad.stderr
  wrong = run("--config.batch_size=abc")
  assert wrong.returncode == 1
  assert "flag --config.batch_size=abc: invalid literal for int()" in wrong.stderr
