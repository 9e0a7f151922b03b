"""Shared config helpers: validation with clear errors, `parse_arg`, absl overrides.

Experiment configs are `ml_collections.ConfigDict`s built by `get_config(arg=None)` and read
by scripts with `config_flags.DEFINE_config_file("config", lock_config=True)`. This module
checks them *before* anything is compiled, and every error names the offending key the way
the user would type it on the command line ("config.ddpo.batch_size=-4: must be > 0").

Mesh arithmetic (used here and by `alignjax.parallel.make_mesh`):

    (1) shape = (data, fsdp, tensor), every entry >= 1 or -1 (at most one -1);
    (2) a -1 entry becomes  num_devices / prod(other entries)   (must divide exactly);
    (3) prod(shape) == num_devices;
    (4) the batch dimension is split over data x fsdp, so every global batch size must be
        divisible by data * fsdp (and by the number of processes, which feed equal parts).

Command-line overrides. ml_collections already reports a *wrongly typed* override clearly,
naming the key and the value (`flag --config.batch_size=abc: invalid literal for int() ...`).
A *mistyped key* (`--config.bach_size=4`) ends in a traceback and an escaped `AttributeError`
that lists no valid keys (and no suggestion at all when nothing is close). `flags_parser`
(pass it to `absl.app.run(main, flags_parser=configs.flags_parser)`) turns that into
"unknown config key 'bach_size' in --config.bach_size=4: did you mean 'batch_size'? valid
keys in config: batch_size, ddpo, lr" and exits with status 1 like absl's own flag errors.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections

MESH_AXES = ("data", "fsdp", "tensor")

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


class ConfigError(ValueError):
  """A config value, key or combination is invalid; the message names the key."""


# --------------------------------------------------------------------------- field access
def _keys(node: Any) -> list[str]:
  if isinstance(node, ml_collections.ConfigDict):
    return sorted(node.keys())
  if isinstance(node, Mapping):
    return sorted(str(k) for k in node.keys())
  return []


def _is_section(node: Any) -> bool:
  return isinstance(node, (ml_collections.ConfigDict, Mapping))


def unknown_key_message(name: str, where: str, valid: list[str]) -> str:
  """'unknown key' text with close matches (difflib) and the full list of valid keys."""
  close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
  hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
  return f"{hint}valid keys in {where}: {', '.join(valid) or '(none)'}"


def get_field(config: Any, path: str) -> Any:
  """Value at dotted `path` ("ddpo.batch_size"); a missing key raises ConfigError."""
  node, where = config, "config"
  for part in path.split("."):
    if not _is_section(node):
      raise ConfigError(
          f"{where} is a {type(node).__name__}, not a section: " f"cannot look up config.{path}"
      )
    if part not in node:
      raise ConfigError(
          f"config.{path}: missing key {part!r}; " + unknown_key_message(part, where, _keys(node))
      )
    node, where = node[part], f"{where}.{part}"
  return node


def _number(config: Any, path: str, allow_inf: bool = False) -> float:
  value = get_field(config, path)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"config.{path}={value!r}: must be a number, " f"got {type(value).__name__}")
  if isinstance(value, float) and math.isnan(value):
    raise ConfigError(f"config.{path}=nan: must be a number, not NaN")
  if isinstance(value, float) and math.isinf(value) and not allow_inf:
    raise ConfigError(f"config.{path}={value}: must be a finite number")
  return value


# --------------------------------------------------------------------------- validators
def check_positive(config: Any, *paths: str, allow_inf: bool = False) -> None:
  """Each `config.<path>` is a finite number > 0 (+inf too where `allow_inf`)."""
  for path in paths:
    value = _number(config, path, allow_inf)
    if not value > 0:
      raise ConfigError(f"config.{path}={value!r}: must be > 0")


def check_nonnegative(config: Any, *paths: str, allow_inf: bool = False) -> None:
  """Each `config.<path>` is a finite number >= 0 (+inf too where `allow_inf`)."""
  for path in paths:
    value = _number(config, path, allow_inf)
    if not value >= 0:
      raise ConfigError(f"config.{path}={value!r}: must be >= 0")


def check_finite(config: Any, *paths: str) -> None:
  """Each `config.<path>` is a finite number (any sign)."""
  for path in paths:
    _number(config, path)


def check_optimizer(config: Any, path: str = "optimizer") -> None:
  """`config.<path>` of `alignjax.training.make_optimizer`: every field finite and in range.

  learning_rate > 0, 0 <= b1, b2 < 1, eps > 0, weight_decay >= 0, max_grad_norm finite
  (<= 0 disables clipping).
  """
  check_positive(config, f"{path}.learning_rate", f"{path}.eps")
  for beta in ("b1", "b2"):
    check_range(config, f"{path}.{beta}", 0.0, 1.0, inclusive=(True, False))
  check_nonnegative(config, f"{path}.weight_decay")
  check_finite(config, f"{path}.max_grad_norm")


def check_integer(config: Any, *paths: str) -> None:
  """Each `config.<path>` is an int (bool is refused)."""
  for path in paths:
    value = get_field(config, path)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"config.{path}={value!r}: must be an int, " f"got {type(value).__name__}")


def check_range(
    config: Any, path: str, low: float, high: float, *, inclusive: tuple[bool, bool] = (True, True)
) -> None:
  """`low <= config.<path> <= high` (each bound closed or open as `inclusive` says)."""
  value = _number(config, path)
  ok_low = value >= low if inclusive[0] else value > low
  ok_high = value <= high if inclusive[1] else value < high
  if not (ok_low and ok_high):
    lb, rb = ("[" if inclusive[0] else "("), ("]" if inclusive[1] else ")")
    raise ConfigError(f"config.{path}={value!r}: must lie in {lb}{low}, {high}{rb}")


def check_fraction(config: Any, path: str, *, inclusive: tuple[bool, bool] = (True, True)) -> None:
  """`config.<path>` lies in [0, 1] (endpoints open where `inclusive` says so)."""
  check_range(config, path, 0.0, 1.0, inclusive=inclusive)


def check_choice(config: Any, path: str, choices) -> None:
  """`config.<path>` is one of `choices`; the message lists them."""
  value = get_field(config, path)
  choices = list(choices)
  if value not in choices:
    raise ConfigError(
        f"config.{path}={value!r}: must be one of " f"{', '.join(repr(c) for c in choices)}"
    )


def check_divisible(config: Any, path: str, divisor: int, why: str = "") -> None:
  """`config.<path>` is an int divisible by `divisor` (`why` explains the divisor)."""
  check_integer(config, path)
  value = get_field(config, path)
  if value % divisor:
    reason = f" ({why})" if why else ""
    raise ConfigError(f"config.{path}={value}: must be divisible by {divisor}{reason}")


# --------------------------------------------------------------------------- mesh and batch
def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Mesh sizes {data, fsdp, tensor} with the -1 entry filled in (eqs. 1-3).

  Missing axes default to 1. Unknown axes, sizes that are not ints >= 1 (or one -1), and
  shapes that do not multiply to `num_devices` raise ConfigError naming the sizes.
  """
  if not isinstance(mesh_config, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(
        f"config.mesh must be a mapping over {MESH_AXES}, " f"got {type(mesh_config).__name__}"
    )
  unknown = [k for k in mesh_config.keys() if k not in MESH_AXES]
  if unknown:
    raise ConfigError(
        f"config.mesh: unknown axis {unknown[0]!r}; valid axes: " f"{', '.join(MESH_AXES)}"
    )
  sizes = {axis: mesh_config.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(
          f"config.mesh.{axis}={size!r}: must be an int >= 1, " f"or -1 for 'the remaining devices'"
      )
  described = ", ".join(f"{a}={s}" for a, s in sizes.items())
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f"config.mesh ({described}): at most one axis may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if rest:  # eq. 2
    if num_devices % known:
      raise ConfigError(
          f"config.mesh ({described}) does not fit {num_devices} "
          f"devices: {num_devices} is not divisible by {known}"
      )
    sizes[rest[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:  # eq. 3
    raise ConfigError(
        f"config.mesh ({described}) has {math.prod(sizes.values())} "
        f"devices but {num_devices} devices are available"
    )
  return sizes


def check_mesh_and_batch(
    mesh_config: Mapping[str, int],
    num_devices: int,
    batch_sizes: Mapping[str, int],
    *,
    num_processes: int = 1,
) -> dict[str, int]:
  """Resolves the mesh (eqs. 1-3) and checks every global batch size against it (eq. 4).

  `batch_sizes` maps config paths ("ddpo.batch_size") to global batch sizes. Returns the
  resolved mesh sizes.
  """
  sizes = resolve_mesh_shape(mesh_config, num_devices)
  shards = sizes["data"] * sizes["fsdp"]
  for name, batch in batch_sizes.items():
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
      raise ConfigError(f"config.{name}={batch!r}: must be an int > 0")
    if batch % shards:
      raise ConfigError(
          f"config.{name}={batch}: must be divisible by data*fsdp={shards} (the batch "
          f"is split over mesh data={sizes['data']} x fsdp={sizes['fsdp']} on "
          f"{num_devices} devices)"
      )
    if batch % num_processes:
      raise ConfigError(
          f"config.{name}={batch}: must be divisible by the "
          f"{num_processes} processes that feed equal parts of it"
      )
  return sizes


# --------------------------------------------------------------------------- parse_arg
def _parse_value(name: str, text: str, default: Any) -> Any:
  try:
    if isinstance(default, bool):
      low = text.strip().lower()
      if low in _TRUE:
        return True
      if low in _FALSE:
        return False
      raise ValueError(f"expected one of {_TRUE + _FALSE}")
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str) or default is None:
      return text
    if isinstance(default, (tuple, list)):
      value = ast.literal_eval(text)
      value = value if isinstance(value, (tuple, list)) else (value,)
      return type(default)(value)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(
        f"arg {name}={text!r}: cannot parse as " f"{type(default).__name__} ({e})"
    ) from None
  raise ConfigError(
      f"arg {name}: default of type {type(default).__name__} is not "
      "supported (use bool, int, float, str, None, tuple or list)"
  )


def _split_top_level(arg: str) -> list[str]:
  """Splits on commas outside (), [] and {} so tuple values may contain commas."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(arg):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      items.append(arg[start:i])
      start = i + 1
  items.append(arg[start:])
  return items


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """big_vision-style `get_config(arg)` parsing: "a=1,b=x,flag" -> ConfigDict.

  Each value is parsed with the type of its default (bool accepts true/false/yes/no/1/0;
  tuples and lists are Python literals, whose commas may stay inside their brackets, e.g.
  "dims=(1, 2)"; a default of None keeps the string). A bare name
  sets a bool to True. Keys without a default raise ConfigError listing the valid keys.
  """
  result = dict(defaults)
  for item in _split_top_level(arg or ""):
    item = item.strip()
    if not item:
      continue
    name, eq, text = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ConfigError(
          f"arg {name!r} in {arg!r} is unknown; "
          + unknown_key_message(name, "arg", sorted(defaults))
      )
    if not eq:
      if not isinstance(defaults[name], bool):
        raise ConfigError(
            f"arg {name!r} needs a value ({name}=...); only bool " "args may be given bare"
        )
      result[name] = True
    else:
      result[name] = _parse_value(name, text, defaults[name])
  return ml_collections.ConfigDict(result)


# --------------------------------------------------------------------------- absl overrides
def check_override_keys(config: Any, argv, flag_name: str = "config") -> None:
  """Every `--<flag_name>.a.b=v` in argv names an existing key; else ConfigError."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(flag_name)}\.([^=]+)")
  for arg in argv:
    match = pattern.match(arg)
    if not match:
      continue
    node, where = config, flag_name
    for part in match.group(1).split("."):
      if not _is_section(node):
        raise ConfigError(
            f"{arg}: {where} is a {type(node).__name__}, " f"not a section with key {part!r}"
        )
      if part not in node:
        raise ConfigError(
            f"unknown config key {part!r} in {arg}: "
            + unknown_key_message(part, where, _keys(node))
        )
      node, where = node[part], f"{where}.{part}"


def _config_from_argv(flag_values, argv, flag_name: str):
  """Loads the config named by --<flag_name>=... (or its default) with the flag's parser."""
  flag = flag_values[flag_name]
  argument = flag.default
  prefix = re.compile(rf"^--?{re.escape(flag_name)}=(.*)$")
  for i, arg in enumerate(argv):
    if (m := prefix.match(arg)) is not None:
      argument = m.group(1)
    elif arg in (f"--{flag_name}", f"-{flag_name}") and i + 1 < len(argv):
      argument = argv[i + 1]
  if argument is None:
    return None
  return flag.parser.parse(argument) if isinstance(argument, str) else argument


def parse_config_flags(argv, *, flag_values=None, flag_name: str = "config"):
  """Parses argv into `flag_values` (absl FLAGS by default), naming bad override keys.

  Returns the remaining positional args like `FlagValues.__call__`. A mistyped override
  key raises ConfigError (unknown key, close matches, valid keys); other flag errors
  (e.g. a value of the wrong type) propagate as absl's `flags.Error`, whose message
  already names the flag and the value.
  """
  from absl import flags

  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except (AttributeError, KeyError) as error:
    try:
      config = _config_from_argv(flag_values, argv, flag_name)
    except Exception:  # the config itself cannot be loaded: keep the original error
      config = None
    if config is not None:
      check_override_keys(config, argv, flag_name)
    raise ConfigError(f"bad --{flag_name} override: {error}") from error


def flags_parser(argv, *, flag_values=None, flag_name: str = "config"):
  """`flags_parser` for `absl.app.run`: clear messages for bad config overrides.

  Prints "FATAL Flags parsing error: <message>" to stderr and exits with status 1, as
  absl does for its own flag errors.
  """
  from absl import flags

  try:
    return parse_config_flags(argv, flag_values=flag_values, flag_name=flag_name)
  except (ConfigError, flags.Error) as error:
    sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
    sys.exit(1)
