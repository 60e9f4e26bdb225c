"""Running jaxlin in real subprocesses from a test: a clean environment and a bounded run that leaves nothing
behind (used by the multi-process tests)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra) -> dict:
    """os.environ without JAXLIN_/XLA_/JAX_ settings of the test process (its 8 simulated devices) but with its
    compile cache, on the CPU and offline, with this checkout importable and PYTHON set for scripts/launch_local.sh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXLIN_", "XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the tests' cache (tests/conftest.py), not one in the checkout
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
    env.update(extra)
    return env


def run_bounded(cmd, env, timeout_s: float, expect: int = 0) -> str:
    """Run ``cmd`` from the repository root in its own session, bounded by ``timeout_s``, check its exit status
    and return its output; the whole process group is killed in the end, so nothing outlives the test."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout_s} s:\n{out[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == expect, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-3000:]}"
    return out
