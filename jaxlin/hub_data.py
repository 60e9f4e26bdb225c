"""GLUE from the Hugging Face hub, for ``--preset paper`` (needs a network, and pyarrow to read parquet).

Single-sentence tasks (SST-2, CoLA: the paper's preset) read as they are. Sentence-pair tasks are joined
with a space, since jaxlin's TextDataset holds one text per example; the paper encodes pairs as pairs.
"""
from __future__ import annotations

import os

from .data import DataError, TextDataset

GLUE = {  # task: (text fields, label names)
    "sst2": (("sentence",), ("negative", "positive")),
    "cola": (("sentence",), ("unacceptable", "acceptable")),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment")),
}


def load_glue(task: str, split: str = "train") -> TextDataset:
    """GLUE ``task`` ("sst2", "cola", …) as a TextDataset; raises DataError saying what to do when offline."""
    if task not in GLUE:
        raise DataError(f"glue/{task} is not supported; choose one of {sorted(GLUE)}")
    fields, names = GLUE[task]
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        import huggingface_hub

        path = huggingface_hub.hf_hub_download("nyu-mll/glue", f"{task}/{split}-00000-of-00001.parquet",
                                               repo_type="dataset", local_files_only=offline)
    except Exception as e:  # network failures come in many types across huggingface_hub versions
        raise DataError(f"cannot fetch glue/{task} from the Hugging Face hub ({type(e).__name__}); this machine "
                        "may be offline. The paper preset needs hub access for roberta-base and GLUE; offline, run "
                        "the default preset or pass --dataset a local CSV/JSONL with text and label columns") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading GLUE's parquet files needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path).to_pydict()
    texts = tuple(" ".join(str(table[f][i]) for f in fields) for i in range(len(table["label"])))
    import numpy as np

    return TextDataset(texts, np.asarray(table["label"], np.int64), names, f"glue/{task}", path)
