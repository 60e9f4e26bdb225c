"""Label-word readouts: a causal LM read as a C-class classifier through the next-token logits of C label words.

    readout = jaxlin.label_word_readout(model.tokenizer, ["negative", "positive"],
                                        template="Review: {text}\\nSentiment:")
    batch = readout.encode(texts, max_length=128)          # prompts, right-padded, real lengths
    kernels = jaxlin.module_ntks(adapted, batch, output_fn=readout.output_fn)  # kernels of (B, C) logits

Class c's logit for a text is the LM's next-token logit, at the prompt's last real token, of the FIRST token of
label word c as it follows the prompt: the token that starts ``prompt + " " + word`` after the prompt's own tokens
(so, with GPT-2-style vocabularies, "Ġpositive", leading space included).

The model computes only what the readout needs: ``readout.output_fn`` asks the model call for
``label_token_ids`` (its ``model_kwargs``, which ``Adapted.as_function(output_fn)`` passes on), so the
decoder takes the last real token's final hidden state (B, D) and the C label rows of its LM head (the tied
embedding or an untied ``lm_head``): logits (B, C), never (B, L, V). Given full (B, L, V) logits instead, the
same ``output_fn`` slices them, which is how the tests check the two agree.

Every stage takes the readout the same way (docs/decoders.md): the readout is the stage's tokenizer (it is a
``jaxlin.data.TokenizerLike`` that formats texts as prompts and right-pads them) and ``output_fn=readout.output_fn``
(`jaxlin.sweep.lambda_sweep`, `jaxlin.probe.probe_adapted`, `jaxlin.study.run_study`, `jaxlin.module_ntks`,
``Adapted.as_function``); `check_readout` refuses a pair that does not go together. f(θ0) is the model's own
zero-shot prediction (`zero_shot_accuracy`), and KRR targets are one-hot minus those logits.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from .data import DataError, pad_batch
from .models.layers import last_real_token
from .models.tokenizer import Tokenizer


READOUTS = ("head", "label_words")  # how a run reads a class score: the model's head, or an LM's label-word logits


@dataclasses.dataclass(frozen=True)
class LabelWordLogits:
    """``output_fn(outputs, batch) -> (B, C)``: the next-token logits of ``token_ids`` at each row's last real token.

    ``model_kwargs`` asks the model for those C logits directly (``outputs`` (B, C)); full causal-LM logits
    (B, L, V) are sliced instead. Hashable, so per-module kernels are compiled once per set of label tokens."""

    token_ids: tuple[int, ...]

    @property
    def model_kwargs(self) -> dict:
        return {"label_token_ids": self.token_ids}

    def __call__(self, outputs, batch):
        c = len(self.token_ids)
        if outputs.ndim == 2 and outputs.shape[-1] == c:
            return outputs
        if outputs.ndim != 3:
            raise ValueError(f"a label-word readout maps causal-LM logits (B, L, V) or its own (B, {c}) logits; got "
                             f"outputs of shape {tuple(outputs.shape)}: load the model with task='causal_lm'")
        return last_real_token(outputs, batch["attention_mask"])[:, jnp.asarray(self.token_ids)]


@dataclasses.dataclass(frozen=True, eq=False)
class Prompts:
    """Texts → token ids of ``template.format(text=…)``, right-padded (a ``jaxlin.data.TokenizerLike``); see
    :func:`prompts`. Every readout can read prompts: the label words at the prompt's last token, or a head there."""

    tokenizer: Tokenizer
    template: str

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def padding_side(self) -> str:
        """Always "right": the label word (or a decoder's head) is read at each row's last real token, and
        positions stay 0 … L−1."""
        return "right"

    def encode_unpadded(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """The prompts' token ids (``jaxlin.data.TokenizerLike``), so ``jaxlin.data.batches(dataset, readout, …)``
        and every stage that takes a tokenizer encode prompts. A prompt longer than ``max_length`` tokens loses
        the end of its text, never the template (whose last token is where the label word is read)."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        texts = list(texts)
        if not texts:
            raise DataError("no texts to encode (got an empty list); pass at least one text")
        if max_length is not None and int(max_length) < 1:
            raise DataError(f"max_length={max_length} leaves no room for a token; pass max_length ≥ 1 or None")
        ids = self._ids([self.prompt(t) for t in texts])
        if max_length is not None:
            ids = [seq if len(seq) <= max_length else self._fit(text, int(max_length)) for seq, text in zip(ids, texts)]
        if not all(ids):
            raise DataError(f"prompt {[len(s) for s in ids].index(0)} has no tokens (an empty text with the template "
                            f"{self.template!r}); drop empty texts or use a template with words around {{text}}")
        return ids

    def encode(self, texts: Sequence[str], max_length: int | None = None,
               pad_to_multiple_of: int = 8) -> dict[str, np.ndarray]:
        """``{"input_ids", "attention_mask"}`` (B, L) int32 of the prompts, right-padded with real lengths, L the
        longest rounded up to ``pad_to_multiple_of`` (truncation as `encode_unpadded`)."""
        return pad_batch(self.encode_unpadded(texts, max_length), pad_token_id=self.pad_token_id,
                         pad_to_multiple_of=pad_to_multiple_of, padding_side="right")

    def _ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer.hf(prompts)["input_ids"]

    def _fit(self, text: str, max_length: int) -> list[int]:
        """The prompt's ids with ``text`` cut (by tokens) until they fit in ``max_length``."""
        text_ids = self.tokenizer.hf(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids)
        while keep > 0:
            ids = self._ids([self.prompt(self.tokenizer.hf.decode(text_ids[:keep]))])[0]
            if len(ids) <= max_length:
                return ids
            keep -= len(ids) - max_length
        ids = self._ids([self.prompt("")])[0]
        if len(ids) > max_length:
            raise DataError(f"the template alone takes {len(ids)} tokens, more than max_length={max_length}; raise "
                            "max_length or shorten the template")
        return ids


@dataclasses.dataclass(frozen=True, eq=False)
class LabelWordReadout(Prompts):
    """Prompts → (B, C) label-word logits; see :func:`label_word_readout`."""

    label_words: tuple[str, ...]
    token_ids: tuple[int, ...]
    output_fn: LabelWordLogits


def prompts(tokenizer, template: str) -> Prompts:
    """``tokenizer`` (``model.tokenizer`` or a Hugging Face tokenizer) applied to ``template.format(text=…)``, a
    text cut (never the template) to fit ``max_length``: what a head reads when the texts go in as prompts.
    Raises ValueError for a template without a single ``{text}`` field."""
    if tokenizer is None:
        raise ValueError("the model has no tokenizer (model.tokenizer is None); load a checkpoint that has one, or "
                         "pass a Hugging Face tokenizer")
    _check_template(template)
    return Prompts(tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer), template)


def label_word_readout(tokenizer, label_words: Sequence[str], template: str | None = None) -> LabelWordReadout:
    """A readout of ``label_words`` (one per class) after ``template`` ("Review: {text}\\nSentiment:"; default
    "{text}"). ``tokenizer``: ``model.tokenizer`` (or a Hugging Face tokenizer). Raises ValueError for a
    template without a single ``{text}`` field, and for label words whose first tokens after the prompt
    collide (naming them)."""
    encoder = prompts(tokenizer, "{text}" if template is None else template)
    words = tuple(label_words) if not isinstance(label_words, str) else None
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"label_words={label_words!r}: pass a list of non-empty words, one per class, e.g. "
                         "['negative', 'positive']")
    token_ids = first_tokens(encoder.tokenizer, encoder.prompt(""), words)
    return LabelWordReadout(encoder.tokenizer, encoder.template, words, token_ids, LabelWordLogits(token_ids))


def check_readout(tokenizer, output_fn, num_classes: int | None = None) -> None:
    """Refuse a stage's (tokenizer, output_fn) pair that cannot go together: label-word logits of texts encoded
    without the readout's template, a readout's prompts read by another output_fn, or C label words for a
    data set of another number of classes. Stages call it before any work."""
    label_words = isinstance(output_fn, LabelWordLogits)
    readout = tokenizer if isinstance(tokenizer, LabelWordReadout) else None
    if label_words and (readout is None or readout.output_fn != output_fn):
        raise ValueError(f"output_fn reads label words {output_fn.token_ids} but the texts are encoded by "
                         f"{type(tokenizer).__name__}; pass tokenizer=readout and output_fn=readout.output_fn, both "
                         "from one jaxlin.label_word_readout(...)")
    if readout is not None and not label_words:
        raise ValueError(f"the texts are encoded as prompts of the label-word readout {readout.label_words} but "
                         f"output_fn={output_fn!r}; pass output_fn=readout.output_fn")
    if label_words and num_classes is not None and len(output_fn.token_ids) != num_classes:
        raise ValueError(f"the readout has {len(output_fn.token_ids)} label words {readout.label_words} but the data "
                         f"have {num_classes} classes; pass one label word per class, in label-id order")


def zero_shot_accuracy(adapted, dataset, readout: LabelWordReadout, *, batch_size: int = 32,
                       max_length: int = 128) -> float:
    """The accuracy at θ0 (``adapted.trainable``; LoRA B0 = 0 is the pretrained model) of argmax over the label
    words' logits on ``dataset`` (a `jaxlin.data.TextDataset` whose label ids follow ``readout.label_words``)."""
    from .data import batches
    from .train import evaluate

    check_readout(readout, readout.output_fn, dataset.num_classes)
    found = evaluate(adapted.as_function(readout.output_fn), adapted.trainable,
                     batches(dataset, readout, batch_size=batch_size, max_length=max_length, padding_side="right"))
    return found["accuracy"]


def _check_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"template={template!r} is not a format string ({e}); write it like "
                         "'Review: {text}\\nSentiment:' (double literal braces: '{{' '}}')") from None
    if fields != ["text"]:
        raise ValueError(f"template={template!r} has fields {fields}; it needs exactly one '{{text}}' and no other "
                         "field, e.g. 'Review: {text}\\nSentiment:'")


def first_tokens(tokenizer: Tokenizer, prompt: str, words: Sequence[str]) -> tuple[int, ...]:
    """The first token id of each ``" " + word`` as it follows ``prompt``. Raises ValueError when the prompt's
    own tokens change under the word, when a first token is whitespace alone, or when two words share one."""
    hf = tokenizer.hf
    prompt_ids, *word_ids = hf([prompt] + [f"{prompt} {w}" for w in words], add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    ids = []
    for word, seq in zip(words, word_ids):
        if seq[:n] != prompt_ids or len(seq) == n:
            raise ValueError(f"the tokens of the prompt {prompt[-30:]!r} change when {' ' + word!r} follows it; "
                             "end the template with punctuation or a newline so the label word starts a new token")
        if not hf.decode([seq[n]]).strip():
            raise ValueError(f"label word {word!r} starts with the whitespace-only token {hf.decode([seq[n]])!r} "
                             "after the prompt; choose a word the vocabulary spells with a leading-space token")
        ids.append(int(seq[n]))
    by_id: dict[int, list[str]] = {}
    for word, i in zip(words, ids):
        by_id.setdefault(i, []).append(word)
    clashes = [ws for ws in by_id.values() if len(ws) > 1]
    if clashes:
        shown = "; ".join(f"{ws} all start with token {hf.decode([ids[words.index(ws[0])]])!r}" for ws in clashes)
        raise ValueError(f"label words must start with different tokens after the prompt, but {shown}; choose "
                         "words whose first tokens differ, ideally words the vocabulary holds whole")
    return tuple(ids)


__all__ = ["LabelWordLogits", "LabelWordReadout", "label_word_readout", "first_tokens", "check_readout",
           "zero_shot_accuracy"]
