"""The notebooks are committed with their outputs, and those outputs are current.

Fast: every committed code cell was executed, has outputs, raised no error, and was not edited since
(`scripts/execute_notebooks.py` records each cell's source digest). Slow: each notebook runs top to bottom again,
through the same `execute`, into a temporary folder, and gives outputs of the same kinds in the same cells; when
this fails, run `scripts/execute_notebooks.py` and commit the notebooks.
"""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")


def _script():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute_notebooks = _script()


def _output_kinds(nb):
    """Per code cell, the kinds of its outputs (stream name, or the output type and its richest MIME type)."""
    def kind(o):
        if o.output_type == "stream":
            return o.name
        return f"{o.output_type}:{max(o.get('data', {}), key=lambda m: m != 'text/plain', default='')}"
    return [[kind(o) for o in c.outputs] for c in nb.cells if c.cell_type == "code"]


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_tour.ipynb", "02_linear_vs_nonlinear.ipynb",
                                          "03_choosing_layers.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_current_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert execute_notebooks.problems(nb) == []
    code = "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in code, "library logic in a notebook"
    assert "image/png" in {m for c in nb.cells if c.cell_type == "code" for o in c.outputs for m in o.get("data", {})} \
        or "plt." not in code, "a notebook that plots should show its plot"


def test_problems_sees_a_missing_error_or_stale_output():
    v4 = nbformat.v4
    ok = v4.new_code_cell("print(1)", execution_count=1, outputs=[v4.new_output("stream", text="1\n")])
    ok.metadata["jaxlin"] = {"source_sha256": execute_notebooks.source_digest(ok.source)}
    assert execute_notebooks.problems(v4.new_notebook(cells=[v4.new_markdown_cell("# t"), ok])) == []
    edited = v4.new_code_cell("print(2)", execution_count=1, outputs=ok.outputs, metadata=ok.metadata)
    empty = v4.new_code_cell("x = 1", execution_count=None, outputs=[])
    error = v4.new_code_cell("1/0", execution_count=1, outputs=[v4.new_output("error", ename="ZeroDivisionError",
                                                                               evalue="", traceback=[])])
    error.metadata["jaxlin"] = {"source_sha256": execute_notebooks.source_digest(error.source)}
    found = execute_notebooks.problems(v4.new_notebook(cells=[edited, empty, error]))
    assert ["edited after" in f for f in found] == [True, False, True, False]
    assert "cell 2 ('x = 1') has no outputs" in found[1] and "cell 3 ('1/0') raised an error" in found[3]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_to_the_committed_outputs(path, tmp_path):
    committed = nbformat.read(path, as_version=4)
    executed = execute_notebooks.execute(path, tmp_path / path.name, cwd=tmp_path)
    assert execute_notebooks.problems(executed) == []
    assert [c.source for c in executed.cells] == [c.source for c in committed.cells]
    assert _output_kinds(executed) == _output_kinds(committed), \
        "the committed outputs are stale: run scripts/execute_notebooks.py and commit the notebooks"
