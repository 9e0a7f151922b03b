"""The Bazel BUILD file stays in step with the tree. Bazel itself cannot run here (it fetches its
rules from the network), so the test evaluates BUILD as the Python subset Starlark is, with
stand-ins for glob() and the rules, and checks the rules it generates: a binary per experiment
script, the kernel sources as data of the library, and for every test file a py_test whose
sources and dependencies cover what it imports (parsed with `ast`): the conftest files pytest
loads for it, the helper test modules beside it, the alignjax and experiments libraries, and
the pip packages, which requirements_lock.txt pins for MODULE.bazel's pip.parse."""

import ast
import glob
import importlib.metadata
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP_HUB = "@pip//"


def read(name):
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def normalize(distribution: str) -> str:
  """A distribution's name as rules_python's requirement() spells its target."""
  return re.sub(r"[-_.]+", "_", distribution).lower()


def starlark_glob(include, exclude=(), allow_empty=True):  # pylint: disable=unused-argument
  """Bazel's glob: files (not directories) under ROOT, sorted, as ROOT-relative paths."""
  found = set()
  for pattern in include:
    for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
      if os.path.isfile(path):
        found.add(os.path.relpath(path, ROOT))
  for pattern in exclude:
    found -= {
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    }
  return sorted(found)


def evaluate_build():
  """{target name: (rule kind, attributes)} of the rules BUILD generates."""
  rules = {}

  def rule(kind):
    def record(name, **attributes):
      assert name not in rules, f"two targets named {name}"
      rules[name] = (kind, attributes)

    return record

  namespace = {
      "load": lambda *args: None,
      "package": lambda **kwargs: None,
      "glob": starlark_glob,
      "requirement": lambda name: PIP_HUB + normalize(name),
      **{kind: rule(kind) for kind in ("py_library", "py_binary", "py_test", "test_suite")},
  }
  exec(compile(read("BUILD"), "BUILD", "exec"), namespace)  # pylint: disable=exec-used
  return rules


RULES = evaluate_build()
TESTS = {
    src: name
    for name, (kind, attributes) in RULES.items()
    if kind == "py_test"
    for src in attributes["srcs"][:1]
}


def closure(name):
  """(library targets, normalized pip distributions) that target `name` depends on, itself
  included, transitively."""
  targets, pip, todo = set(), set(), [name]
  while todo:
    target = todo.pop()
    if target in targets:
      continue
    targets.add(target)
    for dep in RULES[target][1].get("deps", []):
      if dep.startswith(PIP_HUB):
        pip.add(dep[len(PIP_HUB) :])
      else:
        assert dep.startswith(":") and dep[1:] in RULES, f"{target}: unknown dependency {dep}"
        todo.append(dep[1:])
  return targets, pip


def imports(path):
  """Every module `path` imports (absolute names; anywhere in the file, also through
  pytest.importorskip), as (module name, imported names)."""
  tree = ast.parse(read(path))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, ()) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}: relative import (pytest imports tests by file name)"
      found.append((node.module, tuple(alias.name for alias in node.names)))
    elif (
        isinstance(node, ast.Call)
        and ast.unparse(node.func).endswith("importorskip")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
      found.append((node.args[0].value, ()))
  return found


def local_files(module, names):
  """The files under ROOT a local import reads: the module (a .py file or a package's
  __init__.py) and, for `from package import name`, the submodule `name` when there is one."""
  files = []
  for candidate in [module] + [f"{module}.{name}" for name in names]:
    base = candidate.replace(".", "/")
    for path in (base + ".py", base + "/__init__.py"):
      if os.path.isfile(os.path.join(ROOT, path)):
        files.append(path)
  return files


DISTRIBUTIONS = importlib.metadata.packages_distributions()
LOCAL_PACKAGES = {
    d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))
}


def uncovered(target, path):
  """What `path`'s imports need that `target` does not provide, as messages."""
  kind, attributes = RULES[target]
  targets, pip = closure(target)
  library_srcs = {src for t in targets for src in RULES[t][1].get("srcs", [])}
  own = set(attributes.get("srcs", [])) | set(attributes.get("data", []))
  missing = []
  for module, names in imports(path):
    top = module.split(".")[0]
    helper = os.path.join(os.path.dirname(path), top + ".py")
    if top in LOCAL_PACKAGES:
      files = local_files(module, names)
      assert files, f"{path}: {module} is not in the tree"
      missing += [f"{module} ({f})" for f in files if f not in library_srcs]
    elif kind == "py_test" and os.path.isfile(os.path.join(ROOT, helper)):
      if helper not in own:
        missing.append(f"{module} ({helper})")
    elif top in sys.stdlib_module_names:
      continue
    else:
      wanted = {normalize(d) for d in DISTRIBUTIONS.get(top, [top])}
      if not wanted & pip:
        missing.append(f"{module} (requirement({sorted(wanted)[0]!r}))")
  return missing


def conftests_for(test_file):
  """The conftest.py files pytest loads for `test_file`: those of tests/ and of each
  directory between it and the test."""
  parts = os.path.dirname(test_file).split("/")
  found = []
  for depth in range(1, len(parts) + 1):
    conftest = "/".join(parts[:depth]) + "/conftest.py"
    if os.path.isfile(os.path.join(ROOT, conftest)):
      found.append(conftest)
  return found


TEST_FILES = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)
)


def test_every_test_file_has_a_py_test_run_by_pytest():
  assert sorted(TESTS) == TEST_FILES
  for test_file, name in TESTS.items():
    attributes = RULES[name][1]
    assert attributes["main"] == "tests/run_pytest.py" in attributes["srcs"], name
    assert attributes["args"] == [f"$(location {test_file})"], name
  suite = RULES["all_tests"][1]["tests"]
  assert sorted(suite) == sorted(TESTS.values())


@pytest.mark.parametrize("test_file", TEST_FILES)
def test_the_py_test_covers_the_imports_of_its_test_file(test_file):
  """The conftest files pytest loads are in the rule, and every import of the test file, of
  those conftest files and of the helper modules it lists resolves through the rule: local
  modules through its library deps, helper test modules through its srcs, the rest through
  requirement()s."""
  name = TESTS[test_file]
  attributes = RULES[name][1]
  files = set(attributes["srcs"]) | set(attributes.get("data", []))
  for conftest in conftests_for(test_file):
    assert conftest in files, f"{name} lacks {conftest}"
  parsed = [src for src in attributes["srcs"] if src.startswith("tests/")]
  missing = {src: uncovered(name, src) for src in parsed}
  assert not any(missing.values()), {src: m for src, m in missing.items() if m}


@pytest.mark.parametrize("library", ["alignjax", "experiments_lib"])
def test_the_libraries_cover_their_imports(library):
  kind, attributes = RULES[library]
  assert kind == "py_library"
  missing = {src: uncovered(library, src) for src in attributes["srcs"]}
  assert not any(missing.values()), {src: m for src, m in missing.items() if m}


def test_every_requirement_is_pinned_by_the_lock_file():
  lock = read("requirements_lock.txt")
  assert not re.search(r"^(-e|alignjax)", lock, re.M)  # the project itself is not a package
  pinned = {
      normalize(line.split("==")[0])
      for line in lock.splitlines()
      if "==" in line and line[0] != "#"
  }
  named = set()
  for name in RULES:
    named |= closure(name)[1] if RULES[name][0] != "test_suite" else set()
  assert named and named <= pinned, sorted(named - pinned)


def test_module_file_declares_rules_python_python_and_pip():
  module = read("MODULE.bazel")
  assert re.search(r'bazel_dep\(name = "rules_python", version = "[\d.]+"\)', module)
  assert re.search(r'python\.toolchain\([^)]*python_version = "3\.11"', module, re.S)
  assert re.search(
      r'pip\.parse\([^)]*hub_name = "pip"[^)]*requirements_lock = "//:requirements_lock\.txt"',
      module,
      re.S,
  )
  assert 'use_repo(pip, "pip")' in module
  assert 'load("@pip//:requirements.bzl", "requirement")' in read("BUILD")


def test_every_experiment_script_has_a_binary():
  binaries = {name: attributes for name, (kind, attributes) in RULES.items() if kind == "py_binary"}
  scripts = {  # the runnable ones; common.py and lm_common.py are shared by the scripts
      os.path.basename(p)[:-3]
      for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
      if 'if __name__ == "__main__":' in read(os.path.relpath(p, ROOT))
  }
  assert set(binaries) == scripts
  for name, attributes in binaries.items():
    assert attributes["main"] == f"experiments/{name}.py" in attributes["srcs"]
    assert ":experiments_lib" in attributes["deps"]


def test_kernel_sources_are_library_data():
  kernels = starlark_glob(["alignjax/**/*.cc"])
  assert kernels and set(kernels) <= set(RULES["alignjax"][1]["data"])
