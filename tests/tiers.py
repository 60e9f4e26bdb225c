"""The fast tier (``pytest -m "not slow"``) runs a few cases of each parametrized test; the full suite runs all."""
import pytest


def tiered(argnames, cases, fast):
    """``pytest.mark.parametrize(*tiered(argnames, cases, fast))``: every case, those not in `fast` marked slow.
    With several comma-separated `argnames` a case is a tuple of their values."""
    several = "," in argnames
    cases, fast = list(cases), list(fast)
    unknown = [c for c in fast if c not in cases]
    if unknown:
        raise ValueError(f"fast cases {unknown} are not among the cases {cases}")
    return argnames, [c if c in fast else pytest.param(*(c if several else (c,)), marks=pytest.mark.slow)
                      for c in cases]
