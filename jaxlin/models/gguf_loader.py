"""Reading llama.cpp GGUF files: a transformers config, float32 tensors under Hugging Face names, a tokenizer.

Only the ``llama`` architecture is read (Llama, SmolLM, TinyLlama, … as llama.cpp converts them). Every tensor is
dequantized to float32 with ``gguf.quants.dequantize`` (F32, F16, Q8_0, Q4_1, K-quants, …) when it is read and
renamed from llama.cpp's names (``blk.3.attn_q.weight``) to Hugging Face's (``model.layers.3.self_attn.q_proj.weight``).
q/k rows are put back in Hugging Face's order: llama.cpp's converter interleaves the two rotary halves of every head
(``permute_qk``); ``unpermute_qk`` undoes it, as transformers' ``LlamaTensorProcessor`` does. The numpy arrays the
reader returns are already (d_out, d_in) like ``nn.Linear`` weights (ggml lists dims in the reverse order).
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .checkpoint import CheckpointError

TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
IN_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``; CheckpointError for other names."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in IN_BLOCK:
        return f"model.layers.{m.group(1)}.{IN_BLOCK[m.group(2)]}.{m.group(3)}"
    m = _TOP.match(gguf_name)
    if m and m.group(1) in TOP_LEVEL:
        return f"{TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart jaxlin knows (e.g. "
                          "rope_freqs of llama3 rope scaling); convert this model to Hugging Face safetensors "
                          "and load that directory instead")


def permute_qk(w_OI: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of q (n_head = heads) or k (n_head = kv heads) rows: per head, the
    halves [x_0 … x_{d/2-1} | x_{d/2} … x_{d-1}] become interleaved pairs (x_0, x_{d/2}, x_1, …)."""
    return w_OI.reshape(n_head, 2, w_OI.shape[0] // n_head // 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def unpermute_qk(w_OI: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`: llama.cpp's q/k rows back to Hugging Face's rotate-half order."""
    return w_OI.reshape(n_head, w_OI.shape[0] // n_head // 2, 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


class GGUFTensors(Mapping):
    """Lazy ``hf_name -> float32 np.ndarray`` over a GGUF file; each tensor is dequantized when read."""

    def __init__(self, reader, n_head: int, n_head_kv: int):
        self._by_name = {hf_tensor_name(t.name): t for t in reader.tensors}
        self._heads = {"q_proj": n_head, "k_proj": n_head_kv}

    def __getitem__(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._by_name[key]
        value = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        proj = key.rsplit(".", 2)[-2]
        return unpermute_qk(value, self._heads[proj]) if proj in self._heads else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config(reader, tensor_names):
    """A transformers ``LlamaConfig`` from the GGUF metadata (``llama.*`` and ``tokenizer.ggml.*`` keys)."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; jaxlin reads 'llama' GGUF files. "
                              "Load the Hugging Face safetensors checkpoint of this model instead")

    def meta(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise CheckpointError(f"the GGUF file lacks the metadata key 'llama.{key}'; it is not a complete "
                                  "llama.cpp export")
        return value

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"partial rotary embeddings (rope.dimension_count={meta('rope.dimension_count')}, "
                              f"head_dim={head_dim}) are not supported for GGUF files")
    rope = {"rope_type": "default", "rope_theta": float(meta("rope.freq_base", 10000.0))}
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(meta("rope.scaling.factor")))
    elif scaling != "none":
        raise CheckpointError(f"GGUF rope scaling {scaling!r} is not supported; jaxlin reads 'none' and 'linear'")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(meta("vocab_size"))
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")), rope_parameters=rope,
        tie_word_embeddings="lm_head.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))


def read_gguf(path) -> tuple[object, GGUFTensors, object | None]:
    """``(transformers config, {hf_name: float32 array} (lazy), HF tokenizer or None)`` for a llama GGUF file.

    The tokenizer is built from the file's ``tokenizer.ggml.*`` metadata with the ``tokenizers`` library
    (:func:`gguf_tokenizer`; no torch); when the file describes one jaxlin cannot build, it is None and a warning
    says why."""
    path = Path(path)
    reader, config = _open(path), read_gguf_config(path)
    tensors = GGUFTensors(reader, config.num_attention_heads, config.num_key_value_heads)
    return config, tensors, _tokenizer_or_none(reader, path)


def read_gguf_config(path):
    """The transformers config of a llama GGUF file alone (no tokenizer built, no tensor read)."""
    reader = _open(Path(path))
    return llama_config(reader, {hf_tensor_name(t.name) for t in reader.tensors})


def _open(path: Path):
    """The file's `gguf.GGUFReader`, parsed once per process while the file is unchanged (path, mtime and size):
    its metadata (SmolLM2's 49,152-token vocabulary) takes seconds to parse, and a run reads it for its plan and
    again to load."""
    try:
        stat = path.stat()
    except OSError:
        return _parse(path)  # the parse names the missing file
    return _parse_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parse_cached(path: str, mtime_ns: int, size: int):
    return _parse(Path(path))


def _parse(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:  # gguf reports a cut-off file as any of these
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"cannot read {path} as a GGUF file ({size:,} bytes; {type(e).__name__}: {e}). It is "
                              "probably truncated (an interrupted download or copy): download or export it "
                              "again") from None


def _tokenizer_or_none(reader, path: Path):
    try:
        return gguf_tokenizer(reader)
    except CheckpointError as e:
        warnings.warn(f"no tokenizer could be built from {path.name} ({e}); the model loads without one: pass "
                      "token ids yourself", stacklevel=3)
        return None


# ------------------------------------------------------------------------------------------ the tokenizer

# llama.cpp's token types (``tokenizer.ggml.token_type``)
CONTROL, USER_DEFINED = 3, 4

# How each ``tokenizer.ggml.pre`` splits text before byte-level BPE, as llama.cpp's ``llama-vocab.cpp`` does
# (and the models' own tokenizer.json files): "gpt2" is GPT-2's regex; "digits+gpt2" splits every digit off first;
# a regex string is applied before byte mapping (without GPT-2's regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
BYTE_LEVEL_PRE = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits+gpt2"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}


def gguf_tokenizer(reader):
    """A ``transformers.PreTrainedTokenizerFast`` built from a GGUF file's ``tokenizer.ggml.*`` metadata.

    ``tokenizer.ggml.model`` "gpt2" (byte-level BPE: SmolLM2, Llama 3, Qwen2, …) is built with the pre-tokenizer
    ``tokenizer.ggml.pre`` names (:data:`BYTE_LEVEL_PRE`); "llama" (SentencePiece BPE with byte fallback: Llama 2,
    TinyLlama, Mistral) from its pieces and scores. Control tokens (``<|im_start|>``) are matched whole as special
    tokens, user-defined ones as added tokens. CheckpointError names what is missing or unsupported."""
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise CheckpointError("the file has no tokenizer.ggml.model/tokens metadata")
    if model == "gpt2":
        return _wrap(_byte_level_bpe(reader, tokens), reader, tokens, add_bos_default=False)
    if model == "llama":
        return _wrap(_sentencepiece_bpe(reader, tokens), reader, tokens, add_bos_default=True)
    raise CheckpointError(f"tokenizer.ggml.model={model!r} is not supported; jaxlin builds 'gpt2' (byte-level BPE) "
                          "and 'llama' (SentencePiece BPE) tokenizers from GGUF files. Load the model's Hugging Face "
                          "directory (with its tokenizer.json) instead")


def _byte_level_bpe(reader, tokens):
    from tokenizers import Tokenizer as RawTokenizer, decoders, models

    merges = _field(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError("the byte-level BPE tokenizer has no tokenizer.ggml.merges")
    raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                  merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    raw.pre_tokenizer = _byte_level_pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"))
    raw.decoder = decoders.ByteLevel()
    return raw


def _sentencepiece_bpe(reader, tokens):
    """SentencePiece BPE as llama.cpp runs it: spaces become "▁" (one prepended unless add_space_prefix is false),
    the pair whose merged piece scores highest merges first, and bytes without a piece fall back to <0xXX>."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _field(reader, "tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = _field(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError("the SentencePiece tokenizer has neither tokenizer.ggml.merges nor .scores")
        pairs = merges_from_scores(tokens, scores)
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None if unk is None else tokens[int(unk)],
                                  fuse_unk=True, byte_fallback=True))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    raw.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return raw


def merges_from_scores(tokens, scores) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scores: every split (left, right) of a piece into two pieces,
    ranked by the merged piece's score, best first (ties: the vocabulary order of left, then right)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score in zip(tokens, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _byte_level_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre not in BYTE_LEVEL_PRE:
        raise CheckpointError(f"tokenizer.ggml.pre={pre!r} (how text is split before BPE) is not one jaxlin "
                              f"knows ({sorted(BYTE_LEVEL_PRE)}); add its split to jaxlin/models/gguf_loader.py:"
                              "BYTE_LEVEL_PRE, or load the model's Hugging Face directory instead")
    split = BYTE_LEVEL_PRE[pre]
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _wrap(raw, reader, tokens, *, add_bos_default: bool):
    """Special tokens, bos/eos flags and the transformers call interface around a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    raw.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    if raw.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f"the tokenizer built has {raw.get_vocab_size(with_added_tokens=True)} tokens, the "
                              f"file lists {len(tokens)}")

    def special(key):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[int(token_id)]

    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=special("bos"), eos_token=special("eos"), unk_token=special("unknown"),
        pad_token=special("padding"), clean_up_tokenization_spaces=False,
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)))
