"""Next-token fine-tuning of a causal LM, nonlinear and linearized (docs/decoders.md).

The objective is the causal-LM loss on completion tokens only: for (prompt, completion) pairs, the mean over
every completion token t of −log p_θ(x_t | x_<t), the prompt tokens giving context but no loss. The linearized
model is the first-order Taylor model of the next-token logits at θ0, f̄(θ) = f(θ0) + J(θ − θ0), one `jax.jvp`
through the whole sequence (`jaxlin.linearize`), trained by the same optax step (`jaxlin.train.fit` with
``loss_fn=``). No kernel is built for this objective.

    model = jaxlin.load_pretrained("SmolLM2-135M-Instruct", task="causal_lm")
    adapted = jaxlin.add_lora(model, targets=("q_proj", "v_proj"), layers=(28, 29), rank=8)
    readout = jaxlin.label_word_readout(model.tokenizer, ["negative", "positive"], "Review: {text}\\nSentiment:")
    train = completions_from_labels(train_texts, readout)      # or load_completions("pairs.jsonl")
    results = lambda_sweep(adapted, train, held_out, model.tokenizer, lambdas=[...], config=TrainConfig(...),
                           objective=NextTokenObjective())

Memory. The model is asked for logits only where the loss needs them: a batch carries ``positions`` (B, K), the
position before each of the K completion tokens of a row, and the decoder returns (B, K, V), never (B, L, V); K is
the longest completion of the batch rounded up to a power of two (so few shapes compile). Evaluation keeps the
(T, V) logits of the T evaluated completion tokens on the host, so keep held-out sets small when V is large.

Batches hold ``input_ids``/``attention_mask`` (B, L) right-padded, ``positions``/``targets`` (B, K) int32,
``target_mask`` (B, K) float32 (1 for a real completion token of a real row), ``example_mask`` (B,) and ``index``
(B,) as `jaxlin.data.batches` does (a short last batch is filled with masked copies of its first row).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from .data import DataError, TextDataset, pad_batch, read_rows
from .readout import LabelWordReadout
from .sweep import ClassificationObjective, output_comparison
from .train import TrainConfig, linearized_function


# ------------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True, eq=False)
class CompletionDataset:
    """(prompt, completion) text pairs; the loss is on the completion's tokens only."""

    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    name: str
    source: str

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "completions", tuple(self.completions))
        if len(self.prompts) != len(self.completions):
            raise DataError(f"{self.name}: {len(self.prompts)} prompts but {len(self.completions)} completions; pass "
                            "one completion per prompt")
        empty = [i for i, c in enumerate(self.completions) if not c.strip()]
        if empty:
            raise DataError(f"{self.name}: completion {empty[0]} is empty ({len(empty)} such); every pair needs "
                            "completion text to train on")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices) -> CompletionDataset:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(self, prompts=tuple(self.prompts[i] for i in idx),
                                   completions=tuple(self.completions[i] for i in idx))


def load_completions(path, *, prompt_column: str = "prompt", completion_column: str = "completion",
                     encoding: str = "utf-8") -> CompletionDataset:
    """A ``.csv``, ``.tsv`` or ``.jsonl`` file with a prompt and a completion column. The completion is the text
    that follows the prompt verbatim: write its leading space (" positive") where the words are separated."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        raise DataError(f"{path}: completions are read from .csv, .tsv or .jsonl files, not {path.suffix!r}")
    if not path.is_file():
        raise DataError(f"completion file {path} not found (working directory {pathlib.Path.cwd()}); check the path")
    rows = read_rows(path, encoding, prompt_column, completion_column)
    bad = [(line, c) for line, _, c in rows if not isinstance(c, str)]
    if bad:
        raise DataError(f"{path} line {bad[0][0]}: completion {bad[0][1]!r} is not a string; write the completion "
                        "as text")
    return CompletionDataset(tuple(p for _, p, _ in rows), tuple(c for _, _, c in rows), name=path.stem,
                             source=str(path.resolve()))


def completions_from_labels(dataset: TextDataset, readout) -> CompletionDataset:
    """A labelled data set rendered as completions: prompt ``readout.template.format(text=text)``, completion
    ``" " + label_word`` of the example's label (label i ↔ ``readout.label_words[i]``)."""
    words = readout.label_words
    if len(words) != dataset.num_classes:
        raise DataError(f"{dataset.name} has {dataset.num_classes} classes {dataset.label_names} but the readout has "
                        f"{len(words)} label words {words}; pass one label word per class, in label-id order")
    return CompletionDataset(tuple(readout.prompt(t) for t in dataset.texts),
                             tuple(" " + words[int(y)] for y in dataset.labels),
                             name=f"{dataset.name}-completions", source=dataset.source)


def _hf(tokenizer):
    hf = getattr(tokenizer, "hf", tokenizer)
    if not callable(hf):
        raise TypeError(f"{type(tokenizer).__name__} cannot tokenize completions; pass model.tokenizer (a "
                        "jaxlin Tokenizer) or a Hugging Face tokenizer")
    return hf


def tokenize_completions(dataset: CompletionDataset, tokenizer, max_length: int) -> list[tuple[list, list]]:
    """(prompt ids, completion ids) per pair: the prompt with the tokenizer's special tokens (BOS where it adds
    one), the completion without, tokenized apart so the loss mask is exact. When a pair is longer than
    ``max_length`` the prompt loses tokens from its start; a completion that alone fills ``max_length`` is
    refused."""
    hf = _hf(tokenizer)
    prompt_ids = hf(list(dataset.prompts))["input_ids"]
    completion_ids = hf(list(dataset.completions), add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if len(c) >= max_length:
            raise DataError(f"completion {i} ({dataset.completions[i][:40]!r}) has {len(c)} tokens, leaving no room "
                            f"for its prompt in max_length={max_length}; raise max_length or shorten it")
        if not p:
            raise DataError(f"prompt {i} has no tokens; the first completion token needs a token to follow")
        out.append((list(p[len(p) + len(c) - max_length:]) if len(p) + len(c) > max_length else list(p), list(c)))
    return out


def pad_completions(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_token_id: int,
                    pad_to_multiple_of: int = 8) -> dict[str, np.ndarray]:
    """One batch of (prompt ids, completion ids) pairs: ``input_ids``/``attention_mask`` (B, L) right-padded,
    ``positions`` (B, K) (the position of the token before each completion token), ``targets`` (B, K) and
    ``target_mask`` (B, K); K the longest completion rounded up to a power of two."""
    longest = max(len(c) for _, c in pairs)
    k = 1 << (longest - 1).bit_length()
    out = pad_batch([list(p) + list(c) for p, c in pairs], pad_token_id=pad_token_id,
                    pad_to_multiple_of=pad_to_multiple_of, padding_side="right")
    positions, targets, mask = (np.zeros((len(pairs), k), dtype) for dtype in (np.int32, np.int32, np.float32))
    for row, (p, c) in enumerate(pairs):
        n = len(c)
        positions[row, :n] = len(p) - 1 + np.arange(n)
        targets[row, :n], mask[row, :n] = c, 1.0
    return {**out, "positions": positions, "targets": targets, "target_mask": mask}


def completion_batches(dataset: CompletionDataset, tokenizer, *, batch_size: int, max_length: int,
                       shuffle: bool = False, seed: int = 0, pad_to_multiple_of: int = 8) -> Iterator[dict]:
    """One epoch of fixed-size batches of `pad_completions` (see the module doc for the keys); same seed, same
    batches; every pair appears once per epoch."""
    if batch_size < 1 or max_length < 2:
        raise DataError(f"batch_size={batch_size} must be ≥ 1 and max_length={max_length} ≥ 2")
    pairs = tokenize_completions(dataset, tokenizer, max_length)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = _hf(tokenizer).eos_token_id if pad is None else pad
    order = np.random.default_rng(seed).permutation(len(pairs)) if shuffle else np.arange(len(pairs))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        real = len(idx)
        idx = np.concatenate([idx, np.full(batch_size - real, idx[0])])
        batch = pad_completions([pairs[i] for i in idx], pad_token_id=int(pad or 0),
                                pad_to_multiple_of=pad_to_multiple_of)
        example_mask = (np.arange(batch_size) < real).astype(np.float32)
        batch["target_mask"] = batch["target_mask"] * example_mask[:, None]
        yield {**batch, "example_mask": example_mask, "index": np.where(example_mask > 0, idx, -1)}


# --------------------------------------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True)
class TokenLogits:
    """``f(trainable, batch) -> (B, K, V)``: the adapted causal LM's next-token logits at ``batch["positions"]``.
    A pytree whose leaves are the frozen weights and the gate (``adapted`` is static), like
    `jaxlin.adapters.AdaptedFunction`; ``gate_M`` switches LoRA modules as its gate does (`run_study`)."""

    adapted: Any
    frozen: Any
    gate_M: Any = None

    def __call__(self, trainable, batch):
        if self.gate_M is not None:
            trainable = self.adapted.gated(trainable, self.gate_M)
        return self.adapted.apply(trainable, self.frozen, batch["input_ids"], batch["attention_mask"],
                                  positions=batch["positions"])


jax.tree_util.register_dataclass(TokenLogits, data_fields=["frozen", "gate_M"], meta_fields=["adapted"])


def next_token_functions(adapted, gate=None) -> tuple[TokenLogits, Partial]:
    """(f, f̄): the next-token logits (B, K, V) of the adapted causal LM and its linearization at θ0 =
    ``adapted.trainable`` (a jvp through the whole sequence). ``gate``: 0/1 per LoRA module, as
    `jaxlin.adapters.Adapted.as_function`'s (module i trains iff gate[i] = 1; the κ study's one compiled step)."""
    if adapted.model.task != "causal_lm":
        raise ValueError(f"next-token fine-tuning reads the LM head: load the model with task='causal_lm' (it was "
                         f"loaded with task={adapted.model.task!r})")
    f = TokenLogits(adapted, adapted.frozen, None if gate is None else adapted.as_function(gate=gate).gate_M)
    return f, linearized_function(f, adapted.trainable)


@dataclasses.dataclass(frozen=True)
class _NextTokenLoss:
    def __call__(self, logits_fn, trainable, batch):
        logits_BKV = logits_fn(trainable, batch)
        per_BK = optax.softmax_cross_entropy_with_integer_labels(logits_BKV, batch["targets"])
        mask_BK = batch["target_mask"].astype(per_BK.dtype)
        value = jnp.sum(jnp.where(mask_BK > 0, per_BK, 0.0)) / jnp.maximum(jnp.sum(mask_BK), 1.0)
        return value, {"logits": logits_BKV, "per_token": per_BK}


def next_token_loss(logits_fn: Callable) -> Partial:
    """Pure ``loss(trainable, batch) -> (mean over the batch's completion tokens of −log p(x_t | x_<t),
    {"logits" (B, K, V), "per_token" (B, K)})`` for ``jaxlin.train.fit(..., loss_fn=)``; ``logits_fn`` is f or f̄
    of `next_token_functions`."""
    return Partial(_NextTokenLoss(), logits_fn)


def _call(fn, *args):
    return fn(*args)


_forward = jax.jit(_call)  # the one jit of evaluation: the loss (and its model) is an argument


def evaluate_next_token(logits_fn: Callable, trainable, batches) -> dict:
    """Over the completion tokens of `batches`: "loss" (mean −log p), "accuracy" (greedy token = the completion's),
    "outputs" (T, V) float32 logits, "targets" (T,) and "first_token" (T,) bool (a completion's first token),
    tokens in example order."""
    loss_fn = next_token_loss(logits_fn)
    logits, per, targets, index, column, seen = [], [], [], [], [], 0
    for batch in batches:
        _, aux = _forward(loss_fn, trainable, {k: v for k, v in batch.items() if k != "index"})
        keep_BK = np.asarray(batch["target_mask"]) > 0
        idx = np.asarray(batch.get("index", seen + np.arange(len(keep_BK))))
        seen += len(keep_BK)
        rows, cols = np.nonzero(keep_BK)
        logits.append(np.asarray(aux["logits"], np.float32)[rows, cols])
        per.append(np.asarray(aux["per_token"])[rows, cols])
        targets.append(np.asarray(batch["targets"])[rows, cols])
        index.append(idx[rows])
        column.append(cols)
    if not logits:
        raise ValueError("evaluate_next_token got no batches; pass a non-empty iterable of batches")
    order = np.lexsort((np.concatenate(column), np.concatenate(index)))  # example-major, then token order
    logits_TV, per_T, targets_T, column_T = (np.concatenate(x)[order] for x in (logits, per, targets, column))
    return {"loss": float(per_T.mean()), "accuracy": float((logits_TV.argmax(-1) == targets_T).mean()),
            "outputs": logits_TV, "targets": targets_T, "first_token": column_T == 0}


def label_word_logits(found: dict, token_ids) -> np.ndarray:
    """(N, C): the logits of the C label words (``token_ids``, a readout's) at the first token of each of the N
    completions in `evaluate_next_token`'s result ``found``, in example order: on completions rendered by
    `completions_from_labels`, the label-word readout's logits of each prompt."""
    return found["outputs"][found["first_token"]][:, np.asarray(token_ids)]


def label_word_accuracy(found: dict, token_ids) -> float:
    """The classification accuracy inside `evaluate_next_token`'s result ``found`` on completions rendered by
    `completions_from_labels`: at each completion's first token, argmax over the C label words' logits
    (`label_word_logits`) against the completion's own first token, as the label-word readout classifies."""
    predicted = np.asarray(token_ids)[label_word_logits(found, token_ids).argmax(-1)]
    return float(np.mean(predicted == found["targets"][found["first_token"]]))


@dataclasses.dataclass(frozen=True)
class NextTokenObjective:
    """`jaxlin.sweep.lambda_sweep`'s ``objective=`` for next-token fine-tuning on a `CompletionDataset` (pass
    ``model.tokenizer`` as the sweep's tokenizer). The sweep then reports, per λ, the per-token KL between the
    two models' next-token distributions and the agreement of their greedy tokens on held-out completion tokens;
    "accuracy" is the fraction of completion tokens predicted greedily.

    With ``readout`` (a `jaxlin.label_word_readout`), labelled `jaxlin.data.TextDataset`s train as
    ``completions_from_labels(dataset, readout)`` (the tokenizer may be the readout itself, as in ``jaxlin run``),
    and "accuracy" is the label-word accuracy (`label_word_accuracy`), comparable with the readout's zero-shot and
    kernel accuracies; "token_accuracy" keeps the greedy-token one."""

    name: str = "next_token"
    readout: LabelWordReadout | None = None

    def functions(self, adapted):
        return next_token_functions(adapted)

    def batches(self, dataset, tokenizer, config: TrainConfig, *, shuffle: bool, seed: int):
        if self.readout is not None and isinstance(dataset, TextDataset):
            dataset = completions_from_labels(dataset, self.readout)
        if isinstance(tokenizer, LabelWordReadout):  # it formats prompts; completions are tokenized by its tokenizer
            tokenizer = tokenizer.tokenizer
        if not isinstance(dataset, CompletionDataset):
            raise TypeError(f"the next-token objective trains on a CompletionDataset, got {type(dataset).__name__}; "
                            "use completions_from_labels(dataset, readout) or load_completions(path)")
        return completion_batches(dataset, tokenizer, batch_size=config.batch_size, max_length=config.max_length,
                                  shuffle=shuffle, seed=seed, pad_to_multiple_of=config.pad_to_multiple_of)

    def loss_fn(self, apply_fn):
        return next_token_loss(apply_fn)

    def evaluate(self, apply_fn, trainable, batches, config: TrainConfig) -> dict:
        found = evaluate_next_token(apply_fn, trainable, batches)
        if self.readout is None:
            return found
        return {**found, "token_accuracy": found["accuracy"],
                "accuracy": label_word_accuracy(found, self.readout.token_ids)}

    def compare(self, f_TV, f_bar_TV) -> dict:
        return output_comparison(f_TV, f_bar_TV)

    def study_functions(self, tokenizer, output_fn) -> tuple[Callable, Callable]:
        """As `ClassificationObjective.study_functions`: ``gated(adapted, gate_M)`` the gated next-token logits of
        `next_token_functions`, ``readout_logits(found)`` the label words' logits (`label_word_logits`). Refused
        unless the study reads this objective's label-word readout."""
        readout = self.readout
        if output_fn is None or readout is None or readout.output_fn != output_fn or tokenizer is not readout:
            raise ValueError("run_study(objective=NextTokenObjective(...)) trains the next-token loss of the study's "
                             "label words: pass tokenizer=readout, output_fn=readout.output_fn and objective="
                             "NextTokenObjective(readout=readout) (jaxlin.next_token.run_objective('next_token', "
                             "readout)) with one label-word readout")
        return (lambda adapted, gate_M: next_token_functions(adapted, gate=gate_M)[0]), \
            (lambda found: label_word_logits(found, readout.token_ids))


OBJECTIVES = ("classification", "next_token")  # `train.objective` of `jaxlin run`: what the sweep and study train


def run_objective(name: str, readout: LabelWordReadout | None = None):
    """The objective of the λ sweep and the κ study for ``train.objective = name`` (docs/decoders.md):
    "classification", the C-class `TrainConfig.loss` of the readout's logits (the head's; the label words' with
    ``readout``), or "next_token", the LM's own next-token cross-entropy over its whole vocabulary on each label
    word after its prompt (`NextTokenObjective` with ``readout``, which it needs). Raises ValueError naming the
    fix otherwise."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    if name == "classification":
        return ClassificationObjective(None if readout is None else readout.output_fn)
    if readout is None:
        raise ValueError("objective='next_token' trains the next-token loss of the label words after their prompt: "
                         "pass the label-word readout (jaxlin.label_word_readout; --readout label_words)")
    return NextTokenObjective(readout=readout)


__all__ = ["CompletionDataset", "load_completions", "completions_from_labels", "tokenize_completions",
           "pad_completions", "completion_batches", "TokenLogits", "next_token_functions", "next_token_loss",
           "evaluate_next_token", "label_word_logits", "label_word_accuracy", "NextTokenObjective", "OBJECTIVES",
           "run_objective"]
