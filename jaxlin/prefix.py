"""Frozen prefixes: the blocks below the lowest trained one, computed once per example.

When fine-tuning trains only blocks k, k+1, … (LoRA on the last layers of an LLM, a study configuration that adapts
one upper layer) and the head, blocks 0 … k−1 compute the same hidden states at every step, for every λ and for the
linearized model alike: their parameters never move. `frozen_prefix(f, trainable0)` returns a `FrozenPrefix`
whose ``function`` runs blocks k … on the hidden states a batch carries, and whose ``attach(batch)`` adds those
hidden states ("prefix_hidden_BLD", (B, L, D)), computing each example's once and keeping it on the host, keyed
by its real token ids. A training step or an evaluation then costs only the blocks it trains.

The results are those of the whole model up to float rounding (the same operations on the same values; XLA may
fuse the split program differently). Batches must be right-padded: a real token's hidden states then do not
depend on how far its batch is padded, so one example's states serve every batch it lands in.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from .adapters import PREFIX_KEY, AdaptedFunction


def _hidden(f: AdaptedFunction, trainable, batch, stop_layer: int):
    return f.hidden(trainable, batch, stop_layer)


# The one jit of prefix forwards: f's frozen weights are arguments (not constants), stop_layer is static.
_hidden_jit = jax.jit(_hidden, static_argnums=3)


@dataclasses.dataclass(eq=False)
class FrozenPrefix:
    """Blocks 0 … ``start_layer``−1 of ``function``'s model at ``trainable0``, cached per example.

    function: the model function from block ``start_layer`` on (`AdaptedFunction` with ``start_layer``); it
      reads "prefix_hidden_BLD" from its batch, so pass it only batches that went through ``attach``.
    attach(batch): the batch with "prefix_hidden_BLD" added (float, zero at padding).
    num_cached, cached_bytes: examples held on the host and their bytes."""

    function: AdaptedFunction
    trainable0: object
    length: int | None = None  # tokens of every prefix forward (None: each batch's own padded length)
    rows: int = 16  # examples per prefix forward
    below: "FrozenPrefix | None" = None  # a lower block's prefix of the same model: this one runs on from its rows
    _rows: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def start_layer(self) -> int:
        return self.function.start_layer

    @property
    def num_cached(self) -> int:
        return len(self._rows)

    @property
    def cached_bytes(self) -> int:
        return int(sum(r.nbytes for r in self._rows.values()))

    def attach(self, batch: dict) -> dict:
        if "parts" in batch:  # a batch in parts of similar length (jaxlin.data.pad_parts): each its own rows
            return {**batch, "parts": tuple(self.attach(part) for part in batch["parts"])}
        ids_BL, mask_BL = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
        lengths_B = mask_BL.sum(axis=1).astype(int)
        if not np.array_equal(mask_BL, np.arange(mask_BL.shape[1])[None, :] < lengths_B[:, None]):
            raise ValueError("a frozen prefix needs right-padded batches (each attention_mask row 1…1 0…0); pad on "
                             "the right, or train without the frozen prefix")
        keys = [ids_BL[i, :n].tobytes() for i, n in enumerate(lengths_B)]
        missing = list({k: i for i, k in reversed(list(enumerate(keys))) if k not in self._rows}.values())
        if missing:
            self._compute(ids_BL[missing], lengths_B[missing], [keys[i] for i in missing])
        first = self._rows[keys[0]]
        hidden_BLD = np.zeros(ids_BL.shape + first.shape[1:], first.dtype)
        for i, (k, n) in enumerate(zip(keys, lengths_B)):
            hidden_BLD[i, :n] = self._rows[k]
        return {**batch, PREFIX_KEY: hidden_BLD}

    def _compute(self, ids_ML, lengths_M, keys):
        """Each row's hidden states, in forwards of `rows` examples × `length` tokens (one compiled program): from
        the embeddings, or with ``below`` from its rows (computed there first where missing), running only the
        blocks in between."""
        length = ids_ML.shape[1] if self.length is None else max(self.length, int(lengths_M.max()))
        below = self.below
        base = dataclasses.replace(self.function, start_layer=0 if below is None else below.start_layer)
        if below is not None:
            missing = [i for i, k in enumerate(keys) if k not in below._rows]
            if missing:
                below._compute(ids_ML[missing], lengths_M[missing], [keys[i] for i in missing])
        pad_id = getattr(base.adapted.model.config, "pad_token_id", None) or 0
        for s in range(0, len(keys), self.rows):
            chunk = slice(s, s + self.rows)
            ids_RL = np.full((self.rows, length), pad_id, ids_ML.dtype)
            mask_RL = np.zeros((self.rows, length), np.int32)
            for r, (ids, n) in enumerate(zip(ids_ML[chunk], lengths_M[chunk])):
                ids_RL[r, :n], mask_RL[r, :n] = ids[:n], 1
            mask_RL[len(keys[chunk]):, 0] = 1  # filler rows: one real token, so no row is all padding
            batch = {"input_ids": ids_RL, "attention_mask": mask_RL}
            if below is not None:
                first = below._rows[keys[s]]
                batch[PREFIX_KEY] = np.zeros((self.rows, length) + first.shape[1:], first.dtype)
                for r, (k, n) in enumerate(zip(keys[chunk], lengths_M[chunk])):
                    batch[PREFIX_KEY][r, :n] = below._rows[k]
            found_RLD = np.asarray(_hidden_jit(base, self.trainable0, batch, self.start_layer))
            for r, (k, n) in enumerate(zip(keys[chunk], lengths_M[chunk])):
                self._rows[k] = found_RLD[r, :n].copy()


def frozen_prefix(f: Callable, trainable0, *, length: int | None = None, rows: int = 16,
                  below: FrozenPrefix | None = None) -> FrozenPrefix | None:
    """The `FrozenPrefix` of ``f`` at ``trainable0``, or None when there is nothing to cache: ``f`` is not an
    adapted model's function (`Adapted.as_function`), or its lowest trained block is the first
    (`Adapted.first_trained_layer`, which reads ``f``'s gate). ``length``, ``rows``: the prefix runs on ``rows``
    examples padded to ``length`` tokens at a time (pass the longest padded length the batches can have, so a
    single program serves them all; None: each batch's own length, a program per padded length).
    ``below``: the prefix of a lower block of the same adapted model and frozen blocks (e.g. another configuration
    of a study, whose blocks below its own are also frozen); this one then starts from its cached rows and runs
    only the blocks in between, not every block from the embeddings."""
    if rows < 1 or (length is not None and length < 1):
        raise ValueError(f"frozen_prefix(length={length}, rows={rows}): both must be ≥ 1 (length may be None)")
    if not isinstance(f, AdaptedFunction) or f.start_layer:
        return None
    start = f.adapted.first_trained_layer(None if f.gate_M is None else np.asarray(f.gate_M))
    if start == 0:
        return None
    if below is not None and (below.function.adapted is not f.adapted or not below.start_layer < start):
        raise ValueError(f"frozen_prefix(below=) must be a prefix of the same adapted model ending below block "
                         f"{start}; got one ending at block {below.start_layer}; pass below=None")
    return FrozenPrefix(dataclasses.replace(f, start_layer=start), trainable0, length, rows, below)
