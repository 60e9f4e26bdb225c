"""Test-wide JAX settings, set once before JAX is imported anywhere.

- 8 simulated CPU devices, so sharding tests run on any machine.
- float64 enabled, so dense references are exact; library code is explicit about its dtypes.
- the persistent compilation cache, so a second test run compiles little.
"""
import os
import pathlib

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the tests' compile cache, also for the `jaxlin run` subprocesses they start (tests/processes.py keeps it), so
# no test writes a cache into the checkout; both pytest-xdist workers share it (see _write_cache_entries_whole)
_cache = pathlib.Path(os.environ.get("JAXLIN_COMPILE_CACHE", pathlib.Path.home() / ".cache" / "jaxlin-jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
# every program, however fast it compiles: the suite's are small and many, compiled again after each module's
# clear_caches below, and read back from disk faster than compiled (fast tier warm: 4 min 48 s → 3 min 5 s)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _write_cache_entries_whole():
    """JAX writes a compile-cache entry in place (`LRUCache.put`: `Path.write_bytes`) and XLA aborts on reading
    one half written. The two pytest-xdist workers share the cache (per-worker caches miss: a file goes to
    whichever worker is free), so each worker writes an entry to a temporary file and renames it into place.
    Only without eviction, the tests' setting; where JAX's internals differ its own put is kept."""
    try:
        from jax._src import lru_cache
        suffix, put = lru_cache._CACHE_SUFFIX, lru_cache.LRUCache.put
    except (ImportError, AttributeError):
        return

    def whole_put(self, key, value):
        if getattr(self, "eviction_enabled", True) or not key:
            return put(self, key, value)
        path = self.path / f"{key}{suffix}"
        if not path.exists():
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_bytes(value)
            os.replace(partial, path)

    lru_cache.LRUCache.put = whole_put


_write_cache_entries_whole()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free every compiled program when a test module ends. Each pytest-xdist worker runs many modules, and jit
    caches keep each program (and the models its static arguments hold) alive. A loaded XLA:CPU executable holds
    about 3 memory mappings (measured: 300 executables, +899 maps, all returned by `jax.clear_caches()`), and
    Linux allows 65,530 per process (vm.max_map_count): without this, jaxlib aborted or segfaulted about 85 %
    into the suite, in a cache read or a compile that passes when run alone."""
    yield
    jax.clear_caches()
