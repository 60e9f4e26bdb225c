"""The run directory of ``jaxlin run``: its lock, atomic writes, the stored stages and their keys.

A run holds a lock on its output directory (`output_directory`) and writes every file through a temp file of
its own and an atomic rename (`atomic_write`), so a reader sees an old file or a whole new one and a killed run
leaves nothing half written that a later one would trust; the next run removes the temp files a killed one
left. A finished stage is stored as ``stages/<stage>.json`` (+ ``.npz``) under a key that hashes what it read
(`stage_key`); `read_stage` gives it back only for the same key, and otherwise says why not.
docs/refusals.md lists what a run directory refuses.

A stage that fine-tunes keeps its training state (Orbax checkpoints of its fits) under
``train_state/<stage>/<name>/`` while it runs (`train_state_dir`; the name comes from the stage's key), so a run
killed mid-stage continues it with ``--resume``; the state under other names, or any state when the run does not
resume, is removed before the stage starts, and all of it once the stage is stored (`clear_train_state`;
docs/scaling.md, "Resuming training").
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np


class RunError(RuntimeError):
    """The run cannot go on: its output directory is locked or unwritable, or a stage produced non-finite
    numbers. The one-line message names the problem and the fix."""


def log(msg: str) -> None:
    """A progress or note line of the run, on stderr."""
    print(msg, file=sys.stderr, flush=True)


def default_out_dir(preset: str, resume: bool = False) -> Path:
    """``./jaxlin-out/<preset>-<timestamp>``; with `resume` the newest existing one of that preset."""
    root = Path("jaxlin-out")
    if resume:
        previous = sorted(root.glob(f"{preset}-*"))
        if previous:
            return previous[-1]
    return root / f"{preset}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------------------------------ stage store

# A stored stage: stages/<stage>.json {"stage", "key", "inputs", "seconds", "finished", "arrays", "result"} (and
# "efficiency", its compiles and padded tokens, optional: older stages lack it) and, when it has arrays,
# stages/<stage>.npz. The npz is written first and the json last, so a json that parses
# marks a finished stage; `key` hashes the stage name and `inputs` (config, dataset, checkpoint, jaxlin version).

STORED_KEYS = {"stage", "key", "inputs", "seconds", "finished", "arrays", "result"}


def stage_key(stage: str, inputs: dict) -> str:
    """The key of `stage` computed from `inputs` (the fingerprints of what it read)."""
    return hashlib.sha256(json.dumps([stage, inputs], sort_keys=True).encode()).hexdigest()[:16]


def stage_path(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def stage_record(stored: dict, reused: bool) -> dict:
    """What results.json keeps of a stage: {key, reused, seconds, finished}."""
    return {"key": stored["key"], "reused": reused, "seconds": stored["seconds"], "finished": stored["finished"]}


def read_stage(path: Path, key: str, inputs: dict) -> tuple[dict | None, dict, str]:
    """(stored stage, its arrays, "") when `path` holds this key's finished stage, else (None, {}, why not)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, {}, f"{path} is unreadable ({type(e).__name__}), e.g. cut short by a kill"
    if not isinstance(stored, dict) or not STORED_KEYS <= set(stored):
        return None, {}, f"{path} lacks the input keys of this jaxlin (written by an older one, or damaged)"
    if stored.get("key") != key:
        old = stored["inputs"] if isinstance(stored["inputs"], dict) else {}
        changed = [name for name in ("dataset", "checkpoint", "config", "jaxlin", "format")
                   if old.get(name) != inputs[name]]
        what = {"dataset": "the dataset changed", "checkpoint": "the checkpoint changed",
                "config": "the config changed",
                "jaxlin": f"jaxlin changed ({old.get('jaxlin')} → {inputs['jaxlin']})",
                "format": f"the results format changed ({old.get('format')} → {inputs['format']})"}
        return None, {}, (", ".join(what[c] for c in changed) or "its key differs") + " since the stored stage"
    if not stored["arrays"]:
        return stored, {}, ""
    npz = path.with_suffix(".npz")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        return None, {}, f"{npz} is missing or unreadable ({type(e).__name__}), e.g. cut short by a kill"
    if sorted(arrays) != stored["arrays"]:
        return None, {}, f"{npz} does not hold the arrays {path.name} lists"
    return stored, arrays, ""


def write_stage(path: Path, stored: dict, arrays: dict) -> None:
    """Store a finished stage: its npz (when it has arrays) first, its json last, both atomically."""
    try:
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)  # the stage is unfinished until its json is back
    except OSError as e:
        raise RunError(_os_message(path.parent, e)) from None
    if arrays:
        atomic_write(path.with_suffix(".npz"), lambda f: np.savez(f, **arrays))
    atomic_write(path, lambda f: f.write(json.dumps(stored, allow_nan=False).encode()))


# ------------------------------------------------------------------------------------------- training state

TRAIN_STATE = "train_state"


def train_state_dir(out: Path, stage: str, name: str) -> Path:
    """Where the fits of `stage` keep the training state `name` (of one stage key): a path computed from its
    arguments alone, so every process of a run names the same one (Orbax creates it on the primary process)."""
    return out / TRAIN_STATE / stage / name


def clear_train_state(out: Path, stage: str, keep: str | None = None) -> list[str]:
    """Remove the training state of `stage` under `out`, except the one named `keep`; the names removed. Only the
    process that writes the run directory calls it (the others wait for it before their fits start)."""
    root = out / TRAIN_STATE / stage
    removed = sorted(p.name for p in root.iterdir() if p.name != keep) if root.is_dir() else []
    try:
        for name in removed:
            shutil.rmtree(root / name)
        _remove_empty([root, out / TRAIN_STATE])  # when nothing is left in them
    except OSError as e:
        raise RunError(_os_message(root, e)) from None
    return removed


# ------------------------------------------------------------------------------------------ output directory

LOCK_NAME = ".jaxlin.lock"  # {"pid", "host", "started"} of the run writing the directory
LOCK_WRITE_SECONDS = 10.0  # a lock still empty after this long was left by a run that died creating it


@contextlib.contextmanager
def output_directory(out: Path):
    """Create `out` if needed and hold its lock while the block runs. Temp files left by an interrupted run
    are removed first; when the block fails, the lock, this run's temp files and the directories it created
    and left empty go too."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory; pass a new or existing directory")
    created = [d for d in (out, out / "stages") if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(_os_message(out, e)) from None
    try:
        lock = _acquire_lock(out)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        _remove_temp_files(out)
        yield
    except BaseException:
        _remove_temp_files(out, pid=os.getpid())
        raise
    finally:
        lock.unlink(missing_ok=True)
        _remove_empty(created)


def _acquire_lock(out: Path) -> Path:
    path = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _read_lock(path)
        if not _is_stale(path, holder):
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder
                   else "its lock is being written")
            raise RunError(f"{out} is in use by another jaxlin run ({who}); wait for it to finish or pass "
                           f"another --out (if that run is gone, delete {path})") from None
        _take_stale_lock(path, holder)
        log(f"note: taking over the lock of pid {holder.get('pid')} (started {holder.get('started')}), which is no "
            "longer running" if holder else f"note: taking over the empty lock {path} of a run that died taking it")
        return _acquire_lock(out)
    except OSError as e:
        raise RunError(_os_message(out, e)) from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise RunError(_os_message(path, e)) from None
    return path


def _read_lock(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # being written this instant, or damaged
        return {}


def _is_stale(path: Path, holder: dict) -> bool:
    """True when the lock's process is known dead (same host, pid not running), or when the lock has stayed
    unreadable for LOCK_WRITE_SECONDS (its writer died between creating and filling it)."""
    if not holder:
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > LOCK_WRITE_SECONDS
        return False
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _take_stale_lock(path: Path, holder: dict) -> None:
    """Move the stale lock aside atomically; if another run replaced it meanwhile, put that one back."""
    aside = path.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another run took it over first
        return
    if _read_lock(aside) != holder:
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _remove_temp_files(out: Path, pid: int | None = None) -> None:
    """Remove the temp files of `pid` (default: all, left by interrupted runs) from `out` and `out/stages`."""
    pattern = f".*.{pid}.tmp" if pid is not None else "*.tmp"
    stale = [p for d in (out, out / "stages") if d.is_dir() for p in d.glob(pattern)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale and pid is None:
        log(f"note: removed {len(stale)} temp file(s) left by an interrupted run in {out}")


def _remove_empty(directories) -> None:
    for d in sorted(directories, key=lambda d: len(d.parts), reverse=True):  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def atomic_write(path: Path, write: Callable) -> None:
    """Write `path` through `write(binary file)` into a temp file of this process beside it and an atomic
    rename: readers see the old file or the whole new one. On failure the temp file is removed and an OSError
    becomes a one-line RunError."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RunError(_os_message(path, e)) from None
        raise


def _os_message(path: Path, e: OSError) -> str:
    reason = {errno.ENOSPC: "no space is left on its device; free some space or pass another --out",
              errno.EROFS: "it is on a read-only file system; pass a writable --out",
              errno.EACCES: "permission denied; pass a writable --out",
              errno.EPERM: "permission denied; pass a writable --out",
              errno.EDQUOT: "the disk quota is exceeded; free some space or pass another --out"}
    return f"cannot write {path}: {reason.get(e.errno, f'{e.strerror or e}; pass another --out')}"
