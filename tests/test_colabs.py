"""The notebooks of colabs/: each executes top to bottom in its FAST mode, and none is stored
with outputs.

Every notebook has a cell tagged "parameters" (papermill's convention); the test adds a cell
tagged "injected-parameters" after it (or replaces one already there) that sets `FAST = True`:
tiny random models and small sizes. The notebook then runs in a fresh `python3` kernel of the
running interpreter, with the repository root as working directory and on the path (for
`experiments`), JAX_PLATFORMS=cpu, one CPU device (the session's fake devices are not passed
on) and XLA's backend optimisation off, as in the experiments' tiny configs (compilation
dominates the FAST runs), within NOTEBOOK_TIMEOUT seconds for the whole notebook. A failure
names the notebook, the failing cell (its index among the stored notebook's cells and its
first source line) and the error.
"""

import json
import os
import pathlib
import re
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from nbclient.exceptions import CellExecutionError, CellTimeoutError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
NOTEBOOK_TIMEOUT = 300  # seconds for one whole notebook in FAST mode
PARAMETERS = {"FAST": True}


def _ids(paths):
  return [p.stem for p in paths]


def inject_parameters(nb, parameters) -> list:
  """Adds (or replaces) the "injected-parameters" cell after the "parameters" cell.

  Returns, for every cell of the result, its index in the stored notebook (None for the
  injected cell).
  """
  tags = lambda cell: cell.get("metadata", {}).get("tags", [])
  marked = [i for i, c in enumerate(nb.cells) if "parameters" in tags(c)]
  if len(marked) != 1:
    raise AssertionError(f"expected exactly one cell tagged 'parameters', found {len(marked)}")
  source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  cell.pop("id", None)
  at = marked[0] + 1
  origin = list(range(len(nb.cells)))
  if at < len(nb.cells) and "injected-parameters" in tags(nb.cells[at]):
    nb.cells[at] = cell
    origin[at] = None
  else:
    nb.cells.insert(at, cell)
    origin.insert(at, None)
  return origin


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """Environment of the notebook kernels: a `python3` kernel spec of this interpreter first on
  JUPYTER_PATH, one CPU device, the repository root on PYTHONPATH."""
  jupyter_dir = tmp_path_factory.mktemp("jupyter")
  spec_dir = jupyter_dir / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (alignjax tests)",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  env = dict(os.environ)
  # One CPU device, as on Colab (not the session's fake devices), and no LLVM optimisation:
  # the FAST notebooks' tiny programs compile several times faster and run in ms anyway.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  path = [str(jupyter_dir)] + ([env["JUPYTER_PATH"]] if env.get("JUPYTER_PATH") else [])
  env["JUPYTER_PATH"] = os.pathsep.join(path)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  return env


def run_notebook(path: pathlib.Path, env: dict, parameters=PARAMETERS) -> float:
  """Executes the notebook at `path` with `parameters` injected; returns its run time (s)."""
  nb = nbformat.read(path, as_version=4)
  origin = inject_parameters(nb, parameters)
  client = nbclient.NotebookClient(
      nb,
      kernel_name="python3",
      timeout=NOTEBOOK_TIMEOUT,
      resources={"metadata": {"path": str(ROOT)}},
  )
  start = time.monotonic()
  deadline = start + NOTEBOOK_TIMEOUT
  with client.setup_kernel(env=env):
    for index, cell in enumerate(nb.cells):
      if cell.cell_type != "code":
        continue
      client.timeout = max(1, int(deadline - time.monotonic()))
      where = (
          "the injected parameters cell"
          if origin[index] is None
          else f"cell {origin[index]} ({cell.source.strip().splitlines()[0]!r})"
      )
      try:
        client.execute_cell(cell, index)
      except CellExecutionError as e:
        raise AssertionError(
            f"{path.name}: {where} failed: {e.ename}: {e.evalue}\n{_tail(str(e))}"
        ) from None
      except (CellTimeoutError, TimeoutError):
        raise AssertionError(
            f"{path.name}: {where} ran past the notebook's {NOTEBOOK_TIMEOUT} s budget"
        ) from None
  return time.monotonic() - start


def _tail(text: str, lines: int = 30) -> str:
  """The last `lines` lines of a kernel traceback, without its terminal colour codes."""
  return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()[-lines:])


def test_there_are_notebooks():
  assert NOTEBOOKS, "colabs/ holds no notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_in_fast_mode(path, kernel_env, monkeypatch):
  monkeypatch.setenv("JUPYTER_PATH", kernel_env["JUPYTER_PATH"])  # the kernel spec lookup
  seconds = run_notebook(path, kernel_env)
  print(f"{path.name}: executed in {seconds:.1f} s (FAST = True)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [
      i
      for i, cell in enumerate(nb.cells)
      if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
  ]
  assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them"
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
  assert "FAST" in nb.cells[tagged[0]].source, f"{path.name}: the parameters cell sets no FAST"
