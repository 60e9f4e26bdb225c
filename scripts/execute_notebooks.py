#!/usr/bin/env python
"""Execute the notebooks in place, so they are committed with their outputs (plots as PNG).

    .venv/bin/python scripts/execute_notebooks.py                 # every notebooks/*.ipynb, in place
    .venv/bin/python scripts/execute_notebooks.py notebooks/02_linear_vs_nonlinear.ipynb
    .venv/bin/python scripts/execute_notebooks.py --check         # only check the committed ones (no kernel)

Each notebook runs top to bottom in a fresh kernel (nbclient) that imports this checkout's jaxlin, on the CPU
with one device, as a user's would, offline. The notebooks fix their own seeds. What would change on every run
is not kept: execution times, the kernel's language_info, stderr (progress bars, environment warnings) and
how stdout was split into messages (consecutive prints become one output).
Each code cell records the SHA-256 of the source it was run from (metadata "jaxlin"), so `problems` can tell a
cell edited after its outputs were made. tests/test_notebooks.py uses `execute` and `problems` from here: CI
re-executes every notebook into a temporary folder and fails when the committed outputs are missing or stale.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import sys

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 900  # per cell
KERNEL_ENV = {"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "PYTHONHASHSEED": "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
DROPPED_ENV = ("XLA_FLAGS", "JAX_ENABLE_X64")  # e.g. the test suite's 8 simulated devices: not a user's setup


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def kernel_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(KERNEL_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _strip(nb) -> None:
    """Drop what differs between runs of the same code on the same inputs; stamp each code cell's source."""
    nb.metadata.pop("language_info", None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        outputs = []
        for o in cell.outputs:
            if o.output_type == "stream" and o.name == "stderr":
                continue
            if o.output_type == "stream" and outputs and outputs[-1].get("name") == o.name:
                outputs[-1].text += o.text  # how prints split into messages depends on timing: one per stream
            else:
                outputs.append(o)
        cell.outputs = outputs
        cell.metadata["jaxlin"] = {"source_sha256": source_digest(cell.source)}


def execute(path: pathlib.Path, out: pathlib.Path | None = None, *, cwd: pathlib.Path | None = None):
    """Run the notebook at `path` top to bottom; write it with its outputs to `out` (default: `path` itself).

    `cwd`: the kernel's working directory (default: the notebook's folder). Returns the executed notebook.
    """
    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(cwd or path.parent)}})
    client.execute(env=kernel_env())
    _strip(nb)
    nbformat.write(nb, out or path)
    return nb


def problems(nb) -> list[str]:
    """What is wrong with an executed notebook: a code cell not run, without outputs, with an error, or edited
    since its outputs were made (its source no longer matches the digest recorded at execution)."""
    found = []
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        where = f"code cell {i + 1} ({cell.source.splitlines()[0] if cell.source else 'empty'!r})"
        if cell.get("execution_count") is None or not cell.get("outputs"):
            found.append(f"{where} has no outputs")
        if any(o.output_type == "error" for o in cell.get("outputs", [])):
            found.append(f"{where} raised an error")
        stamp = cell.metadata.get("jaxlin", {}).get("source_sha256")
        if stamp != source_digest(cell.source):
            found.append(f"{where} was edited after it was executed")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path, default=NOTEBOOKS)
    parser.add_argument("--check", action="store_true", help="check the committed outputs; execute nothing")
    args = parser.parse_args(argv)
    failed = False
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4) if args.check else execute(path)
        for problem in problems(nb):
            print(f"{path}: {problem}", file=sys.stderr)
            failed = True
        if not args.check:
            print(f"executed {path}")
    if failed and args.check:
        print("run scripts/execute_notebooks.py to execute the notebooks again", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
