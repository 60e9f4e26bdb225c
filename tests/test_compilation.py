"""jaxlin.compilation: the run's persistent compilation cache (set and restored), the compile meter, and the
results.json ``efficiency`` section built from them."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlin import compilation, pipeline
from jaxlin.config import ConfigError
from jaxlin.schema import SchemaError, example_results, validate_results
from processes import clean_env, run_bounded

SETTINGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")


def _settings():
    return tuple(getattr(jax.config, name) for name in SETTINGS)


def test_measure_compiles_counts_each_new_program_once():
    f = jax.jit(lambda x: jnp.cumsum(x * 3.0) - 1.0)
    with compilation.measure_compiles() as meter:
        f(np.ones(37))
        f(np.ones(37))  # compiled already: not counted again
        f(np.ones(41))  # a new shape: a new program
    assert meter.programs == 2 and meter.seconds > 0
    with compilation.measure_compiles() as after:
        f(np.ones(37))
    assert after.programs == 0 and after.seconds == 0.0


def test_compile_cache_settings_hold_inside_the_block_and_are_restored(tmp_path):
    before = _settings()
    assert before[0], "the test suite sets its own cache directory (tests/conftest.py)"
    with compilation.compile_cache("auto") as directory:  # the process's own directory is kept
        assert directory == before[0] and _settings() == before
    with compilation.compile_cache("none") as directory:
        assert directory is None and jax.config.jax_enable_compilation_cache is False
    assert _settings() == before
    target = tmp_path / "new" / "cache"
    with compilation.compile_cache(str(target)) as directory:
        assert directory == str(target) and target.is_dir()
        assert _settings() == (str(target), True, compilation.MIN_COMPILE_SECONDS)
    assert _settings() == before


def test_an_unusable_compile_cache_is_one_line_naming_the_flag(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^compile_cache=.*cannot create .*--compile-cache none$"):
        with compilation.compile_cache(str(blocker / "cache")):
            pass
    assert jax.config.jax_enable_compilation_cache is True


def test_efficiency_section_splits_compile_from_compute_and_validates():
    per_stage = {"setup": {"compile_seconds": 1.0, "compiled_programs": 4, "cache_hits": 0, "real_tokens": 0,
                           "processed_tokens": 0},
                 "ntk": {"compile_seconds": 2.5, "compiled_programs": 3, "cache_hits": 1, "real_tokens": 30,
                         "processed_tokens": 48},
                 "probe": None}  # stored by a jaxlin that did not record it
    timings = {"setup": 3.0, "ntk": 10.0, "probe": 2.0}
    section = pipeline.efficiency_section(per_stage, timings, "/tmp/c")
    assert section["compile_seconds"] == {"setup": 1.0, "ntk": 2.5}
    assert section["compute_seconds"] == {"setup": 2.0, "ntk": 7.5}
    assert section["compiled_programs"] == {"setup": 4, "ntk": 3} and section["cache_hits"]["ntk"] == 1
    assert section["token_fill"] == {"ntk": 30 / 48}  # setup padded no batch
    results = example_results()
    results["efficiency"] = section
    validate_results(results)
    results["efficiency"]["token_fill"]["ntk"] = 1.5
    with pytest.raises(SchemaError, match=r"efficiency.token_fill.ntk"):
        validate_results(results)


@pytest.mark.slow
def test_a_second_process_loads_its_programs_from_the_cache(tmp_path):
    """Two fresh processes compile the same programs with one cache directory: the second reads them back."""
    code = ("import json, sys, jax, jax.numpy as jnp\n"
            "from jaxlin.compilation import compile_cache, measure_compiles\n"
            "def f(x):\n"
            "    for i in range(40):\n"
            "        x = jnp.tanh(x @ x.T + i)\n"
            "    return x\n"
            "with compile_cache(sys.argv[1]), measure_compiles() as m:\n"
            "    jax.jit(f)(jnp.ones((48, 48))).block_until_ready()\n"
            "print(json.dumps([m.seconds, m.programs, m.cache_hits]))\n")
    runs = [json.loads(run_bounded([sys.executable, "-c", code, str(tmp_path / "cache")], clean_env(),
                                   timeout_s=120).strip().splitlines()[-1]) for _ in range(2)]
    (cold_s, cold_programs, cold_hits), (warm_s, warm_programs, warm_hits) = runs
    assert cold_hits == 0 and cold_programs >= 1 and any((tmp_path / "cache").iterdir())
    assert warm_hits >= 1 and warm_programs == cold_programs and warm_s < cold_s
