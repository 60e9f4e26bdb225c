"""The public API: what `jaxlin.__all__` promises exists, `import jaxlin` stays light, and the notebooks use only
public names (no `jaxlin._x` module, no `_name`, nothing outside `__all__`)."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

import jaxlin

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_public_name_exists_and_is_listed_once():
    assert len(set(jaxlin.__all__)) == len(jaxlin.__all__)
    assert [name for name in jaxlin.__all__ if not hasattr(jaxlin, name)] == []
    assert not [name for name in jaxlin.__all__ if name.startswith("_") and name != "__version__"]
    for name in ("fit", "TrainConfig", "evaluate", "model_functions", "lambda_sweep", "sweep_summary", "run_study",
                 "StudyConfig", "study_preset", "RunConfig", "load_config", "preset", "run", "kernel_statistics",
                 "spectral_selection"):
        assert name in jaxlin.__all__, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        jaxlin.not_a_name  # noqa: B018


def test_import_is_light_and_run_is_lazy():
    code = ("import sys, jaxlin; heavy = [m for m in ('matplotlib', 'jaxlin.pipeline', 'jaxlin.report') "
            "if m in sys.modules]; run = jaxlin.run; print(heavy, run.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]", "jaxlin.pipeline"], out.stdout + out.stderr


def _jaxlin_uses(source: str):
    """(kind, dotted name) of every jaxlin import and `jaxlin.<attr>` access in `source`."""
    tree = ast.parse(source)
    aliases = {"jaxlin"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "jaxlin":
                    yield "import", a.name
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jaxlin":
            yield "import", node.module
            for a in node.names:
                yield "from", f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            yield "attribute", f"{node.value.id}.{node.attr}"


def _private_or_unlisted(source: str):
    """Uses outside the public API: a private part anywhere (`jaxlin._x`, `_y`), a submodule import, or a
    `jaxlin.<name>` / `from jaxlin import <name>` that `jaxlin.__all__` does not list."""
    bad = []
    for kind, dotted in _jaxlin_uses(source):
        parts = dotted.split(".")
        if any(p.startswith("_") for p in parts) or (kind == "import" and len(parts) > 1):
            bad.append(dotted)
        elif kind != "import" and (len(parts) != 2 or parts[1] not in jaxlin.__all__):
            bad.append(dotted)
    return bad


def test_the_public_api_check_can_fail():
    assert _private_or_unlisted("import jaxlin._util") == ["jaxlin._util"]
    assert "jaxlin.spectrum._asymmetry" in _private_or_unlisted("from jaxlin.spectrum import _asymmetry")
    assert _private_or_unlisted("import jaxlin\njaxlin._LAZY") == ["jaxlin._LAZY"]
    assert _private_or_unlisted("from jaxlin import testing") == ["jaxlin.testing"]  # public module, not in __all__
    assert _private_or_unlisted("from jaxlin.sweep import lambda_sweep") == ["jaxlin.sweep",
                                                                             "jaxlin.sweep.lambda_sweep"]
    assert _private_or_unlisted("import jaxlin as jl\nfrom jaxlin import fit\njl.fit, jl.run") == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_use_only_the_public_api(path):
    cells = json.loads(path.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "jaxlin" in source
    assert _private_or_unlisted(source) == []
