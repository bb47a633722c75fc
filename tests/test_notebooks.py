"""Every ``notebooks/*.ipynb`` runs top to bottom, and is stored without outputs.

Each notebook found is one test case (its file name is the test id). It is executed in memory
with nbclient on the ``python3`` kernel of this interpreter, with the repository root as the
working directory (so relative paths such as ``configs/`` and ``data/shakespeare`` resolve) and
a clean JAX environment: the test session's ``XLA_FLAGS`` (8 fake CPU devices, see conftest.py)
are not passed on, so the notebook sees the devices a user would. ``TMPDIR`` points into the
test's temporary directory, so whatever a notebook writes through ``tempfile`` is removed with it,
and a notebook that leaves a new file in the repository root, ``notebooks/`` or ``runs/`` fails.
A failing cell fails the test with its index, its source and the error's traceback.

The notebooks take about one to two minutes each on two CPU cores (mostly XLA compilation); one
that takes much longer belongs in ``SLOW`` (the ``slow`` marker, outside the default suite).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SLOW: set[str] = {"02_model_and_training.ipynb", "03_comparison.ipynb"}  # ~1 min each: `make test-all` (suite budget)
CELL_TIMEOUT_S = 900
ALLOWED_NEW_ENTRIES = {"data"}           # the corpus may be fetched into data/shakespeare
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _params():
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW else []) for p in NOTEBOOKS]


def _kernel_env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # The kernelspec launches `python`: make it this interpreter (the venv), activated or not.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["TMPDIR"] = str(tmp_path)
    return env


def _entries() -> set[str]:
    names = {p.name for p in ROOT.iterdir()} | {f"notebooks/{p.name}" for p in NOTEBOOK_DIR.iterdir()}
    runs = ROOT / "runs"
    return names | ({f"runs/{p.name}" for p in runs.iterdir()} if runs.is_dir() else set())


def _failure_report(nb, name: str, err: CellExecutionError) -> str:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return f"{name}: cell {i} raised {err.ename}: {err.evalue}\n{ANSI.sub('', str(err))}"
    return f"{name}: {err.ename}: {err.evalue}\n{ANSI.sub('', str(err))}"


@pytest.mark.parametrize("path", _params())
def test_notebook_runs(path: pathlib.Path, tmp_path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    before = _entries()
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False)
    start = time.perf_counter()
    try:
        client.execute(cwd=str(ROOT), env=_kernel_env(tmp_path))
    except CellExecutionError as err:
        pytest.fail(_failure_report(nb, path.name, err), pytrace=False)
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    new = sorted(_entries() - before - ALLOWED_NEW_ENTRIES)
    assert not new, f"{path.name} wrote {new} into the repository; write under tempfile.mkdtemp() instead"
    errors = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.outputs)]
    assert not errors, f"{path.name}: cells {errors} have error outputs"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: pathlib.Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have stored outputs or execution counts; clear them before "
                       f"saving (Jupyter: Edit > Clear Outputs of All Cells)")
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
