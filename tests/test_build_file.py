"""The Bazel BUILD file stays in step with the tree: a binary per experiment script and the
kernel sources as data of the library (they are compiled on first use)."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_build():
  with open(os.path.join(ROOT, "BUILD")) as f:
    return f.read()


def test_every_experiment_script_has_a_binary():
  listed = re.search(r"\) for script in \[(.*?)\]\]", read_build(), re.S).group(1)
  binaries = set(re.findall(r'"(\w+)"', listed))
  scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))}
  assert binaries == scripts - {"__init__", "common"}


def test_kernel_sources_are_library_data():
  assert 'data = glob(["alignjax/**/*.cc"])' in read_build()
  assert glob.glob(os.path.join(ROOT, "alignjax", "**", "*.cc"), recursive=True)
