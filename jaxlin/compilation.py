"""A run's persistent compilation cache, and the compile time and compiled programs of its stages.

    with compile_cache("auto") as directory:          # ".jaxlin-cache" here, unless the process set JAX's own
        with measure_compiles() as meter:               # backend compiles while the block runs
            ...
        meter.seconds, meter.programs, meter.cache_hits

JAX writes every compiled program (XLA executable) that took at least `MIN_COMPILE_SECONDS` (0: all of them) to
the cache directory and reads it back in a later process instead of compiling it again, so a second ``jaxlin run``
of the same preset skips those compiles (docs/configuration.md, ``execution.compile_cache``). The compile time is JAX's
own measurement (`jax.monitoring`), per backend compile: programs read back from the cache count too, with
their (short) load time. Tracing and lowering to StableHLO are not part of it (the cache does not save them).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

from .config import ConfigError

DEFAULT_DIRECTORY = ".jaxlin-cache"  # "auto": relative to the current directory
MIN_COMPILE_SECONDS = 0.0  # every program is written: reading one back (~35 ms) beats compiling it again, even
# for the many small ones (a warm quick run: 287 programs, compiles 16-18 s at a 0.1 s threshold, 10-12 s at 0)
# what jax.monitoring reports (jax._src.dispatch.BACKEND_COMPILE_EVENT; jax._src.compiler for the hit)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_SETTINGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")


@contextlib.contextmanager
def compile_cache(setting: str) -> Iterator[str | None]:
    """JAX's persistent compilation cache while the block runs; yields its directory (absolute), or None when
    off. `setting`: a directory, ``"none"`` (off), or ``"auto"``: the directory this process already gave JAX
    (``JAX_COMPILATION_CACHE_DIR``, or ``jax.config.update`` in a program that calls jaxlin, as the test suite
    does), else `DEFAULT_DIRECTORY` in the current directory. JAX's settings are restored when the block ends."""
    before = tuple(getattr(jax.config, name) for name in _SETTINGS)
    if setting == "none":
        wanted = (before[0], False, before[2])
    elif setting == "auto" and before[0]:
        wanted = before
    else:
        directory = Path(DEFAULT_DIRECTORY if setting == "auto" else setting).expanduser().absolute()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"compile_cache={setting!r}: cannot create {directory} ({e.strerror or e}); pass a "
                              "writable directory with --compile-cache DIR, or --compile-cache none") from None
        wanted = (str(directory), True, MIN_COMPILE_SECONDS)
    changed = wanted != before
    if changed:
        _apply(wanted)
    try:
        yield wanted[0] if wanted[1] and wanted[0] else None
    finally:
        if changed:
            _apply(before)


def _apply(values) -> None:
    """Set the cache's JAX settings and make JAX open the cache again at its next compile (it opens it once)."""
    for name, value in zip(_SETTINGS, values):
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@dataclasses.dataclass
class CompileMeter:
    """Backend compiles seen by `measure_compiles`: ``seconds`` (compiling, or loading from the persistent
    cache), ``programs`` (each compiled or loaded program) and ``cache_hits`` (those loaded)."""

    seconds: float = 0.0
    programs: int = 0
    cache_hits: int = 0


@contextlib.contextmanager
def measure_compiles() -> Iterator[CompileMeter]:
    """Count the backend compiles of every thread while the block runs (JAX's `jax.monitoring` events); a
    program already compiled in this process is not compiled again and is not counted."""
    meter = CompileMeter()

    def on_duration(event: str, duration: float, **_):
        if event == BACKEND_COMPILE_EVENT:
            meter.seconds += duration
            meter.programs += 1

    def on_event(event: str, **_):
        if event == CACHE_HIT_EVENT:
            meter.cache_hits += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    try:
        yield meter
    finally:
        monitoring.unregister_event_duration_listener(on_duration)
        monitoring.unregister_event_listener(on_event)
