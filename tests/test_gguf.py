"""GGUF reading: a tiny Llama written here the way llama.cpp's converter writes it (q/k rows permuted), read back
exactly; the model it loads against PyTorch transformers; and the packaged SmolLM2-135M-Instruct Q4_1 file
against transformers' own GGUF loader (which dequantizes with the same ``gguf`` package)."""
import time

import chex
import numpy as np
import pytest

from jaxlin.models import CheckpointError, checkpoint, load_pretrained
from jaxlin.models.gguf_loader import permute_qk, read_gguf, unpermute_qk

D, F, LAYERS, HEADS, KV_HEADS, VOCAB, THETA, EPS = 40, 37, 2, 4, 2, 97, 500.0, 1e-5
HEAD_DIM = D // HEADS
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def hf_tensors(tied: bool) -> dict[str, np.ndarray]:
    """Random float32 Llama tensors under Hugging Face names and (d_out, d_in) shapes."""
    rng = np.random.default_rng(11)
    shapes = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, D)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, D),
                       p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, D),
                       p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, D),
                       p + "self_attn.o_proj.weight": (D, HEADS * HEAD_DIM),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F),
                       p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
    return {k: ((1 + 0.3 * rng.normal(size=s)) if len(s) == 1 else 0.2 * rng.normal(size=s)).astype(np.float32)
            for k, s in shapes.items()}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAMES[module]}.{suffix}"


def llama_gguf_writer(path):
    """A GGUF writer with the tiny Llama's architecture metadata."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(EPS)
    return w


def write_tiny_gguf(path, tensors):
    """What llama.cpp's convert_hf_to_gguf.py does for a Llama: metadata, then q/k rows permuted."""
    w = llama_gguf_writer(path)
    w.add_rope_freq_base(THETA)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    for name, value in tensors.items():
        if ".q_proj." in name:
            value = permute_qk(value, HEADS)
        elif ".k_proj." in name:
            value = permute_qk(value, KV_HEADS)
        w.add_tensor(gguf_name(name), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_permutation_roundtrip():
    w = np.arange(2 * 3 * 8 * 5).reshape(2 * 3 * 8 // 2, 10).astype(np.float32)  # 3 heads of 8 rows, 10 inputs
    permuted = permute_qk(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(permuted[:2], w[[0, 4]])  # rows 0 and d/2 of head 0 become neighbours
    np.testing.assert_array_equal(unpermute_qk(permuted, 3), w)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_reads_back_exactly(tmp_path, tied):
    tensors = hf_tensors(tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tensors)
    with pytest.warns(UserWarning, match="no tokenizer"):
        config, read, tokenizer = read_gguf(path)
    assert tokenizer is None
    assert (config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
        "llama", D, F, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (HEADS, KV_HEADS, VOCAB)
    assert config.rope_parameters["rope_theta"] == THETA and config.rms_norm_eps == pytest.approx(EPS)
    assert config.tie_word_embeddings == tied
    chex.assert_trees_all_equal(dict(read), tensors)  # same names, bit for bit


@pytest.mark.torch
def test_tiny_gguf_model_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    tensors = hf_tensors(tied=False)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tensors)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model = load_pretrained(path, task="causal_lm")
    hf = transformers.LlamaForCausalLM(model.config).eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [0, 0, 12, 13, 14, 15, 16], [17, 18, 19, 0, 0, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model.apply(model.params, ids, mask))
    real = mask.astype(bool)
    err = np.abs(got[real] - ref[real]).max() / np.abs(ref[real]).max()
    print("tiny gguf rel err", err)
    assert err <= 1e-4


def test_non_llama_gguf_is_rejected(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'qwen2' is not supported"):
        read_gguf(path)


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_matches_transformers_gguf():
    torch = pytest.importorskip("torch")
    import transformers

    start = time.perf_counter()
    model = load_pretrained("SmolLM2-135M-Instruct", task="causal_lm")
    print(f"SmolLM2 load_pretrained: {time.perf_counter() - start:.1f} s")
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    texts = ["The capital of France is", "Hi there"]
    path = checkpoint.resolve("SmolLM2-135M-Instruct").path
    hf = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    for side in ("right", "left"):
        batch = model.tokenizer(texts, max_length=16, pad_to_multiple_of=1, padding_side=side)
        ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
        assert (mask == 0).any()
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        got = np.asarray(model.apply(model.params, ids, mask))
        real = mask.astype(bool)
        err = np.abs(got[real] - ref[real]).max() / np.abs(ref[real]).max()
        print(f"SmolLM2 {side} padding rel err {err:.2e}")
        assert err <= 1e-4
        np.testing.assert_array_equal(got[real].argmax(-1), ref[real].argmax(-1))


# ------------------------------------------------------------------------------------------ truncated files

@pytest.mark.parametrize("keep", [6, 100, 0.5])
def test_truncated_gguf_names_the_file_and_the_fix(tmp_path, keep):
    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole, hf_tensors(tied=True))
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated.*download or export it again"):
        load_pretrained(cut, task="causal_lm")


# ------------------------------------------------------------------------------------------ tokenizers

def write_tokenizer_gguf(path, *, model="gpt2", pre="smollm"):
    """A GGUF with only tokenizer metadata (a few byte-level tokens), to reach the tokenizer builder's errors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("model, pre, message", [
    ("t5", "default", r"tokenizer.ggml.model='t5' is not supported"),
    ("gpt2", "mystery", r"tokenizer.ggml.pre='mystery' .* not one jaxlin knows"),
])
def test_unsupported_gguf_tokenizer_is_named(tmp_path, model, pre, message):
    import gguf

    from jaxlin.models.gguf_loader import gguf_tokenizer

    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, model=model, pre=pre)
    with pytest.raises(CheckpointError, match=message):
        gguf_tokenizer(gguf.GGUFReader(path))


def test_tiny_byte_level_gguf_tokenizer(tmp_path):
    import gguf

    from jaxlin.models.gguf_loader import gguf_tokenizer

    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path)
    tok = gguf_tokenizer(gguf.GGUFReader(path))
    assert tok("abba")["input_ids"] == [2, 1, 0] and tok.decode([2, 1, 0]) == "abba"


@pytest.fixture(scope="module")
def smollm_gguf():
    return checkpoint.resolve("SmolLM2-135M-Instruct").path


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_gguf):
    import gguf

    from jaxlin.models.gguf_loader import gguf_tokenizer

    return gguf_tokenizer(gguf.GGUFReader(smollm_gguf))


SPECIAL_CASES = [
    "", " ", "  ", "\n", "Hello world", " Hello world", "   three leading spaces", "trailing spaces   ",
    "tabs\tand\ttabs", "line one\nline two\n\nline four\r\nwindows", "I'm sure you're right, it's fine, we'll see",
    "DON'T SHOUT", "café naïve résumé façade", "e\u0301 combining accent", "日本語のテキストです。", "中文分词测试",
    "한국어 문장입니다", "Привет, мир!", "مرحبا بالعالم", "emoji 🙂🚀 and 👩‍💻 zwj, flags 🇫🇷", "3.14159",
    "1,000,000 and 2024-01-01", "a  2 33  444\t\t5", "x1y22z333", "def f(x):\n    return x ** 2\n",
    "https://example.com/path?q=1&r=2", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more", "<|im_start|>", "<repo_name>jaxlin<file_sep>", "    ", "\n\n\n",
    "end with newline\n", "!!! ??? ... ---", "ALL CAPS AND lower", "mixed123numbers456", "$100.00 (approx.)",
]
FRAGMENTS = ["the", "The", "quick", "brown", "fox", "jumps", " over", "lazy", "dog", "42", "7", "2024", "3.5",
             "ça", "über", "naïve", "東京", "😀", "🎉", "👍🏽", "it's", "they'd", "'ll", "!", "?", ",", ".", "(", ")",
             "<|im_end|>", "<|endoftext|>", "x_y", "camelCase", "snake_case", "#", "@user", "\\n", "¿qué?", "α", "β"]
SEPARATORS = ["", " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n"]


def varied_strings(n: int = 300) -> list[str]:
    rng = np.random.default_rng(5)
    out = list(SPECIAL_CASES)
    while len(out) < n:
        parts = rng.choice(FRAGMENTS, size=rng.integers(1, 8))
        seps = rng.choice(SEPARATORS, size=len(parts))
        out.append("".join(s + p for s, p in zip(seps, parts)))
    return out


@pytest.mark.torch
@pytest.mark.slow  # transformers parses the whole SmolLM2 GGUF
def test_smollm_tokenizer_matches_transformers_gguf(smollm_gguf, smollm_tokenizer):
    """Same ids and decoding as transformers' own GGUF conversion, with the pre-tokenizer SmolLM2 was trained with.

    transformers builds "smollm" files with GPT-2's pre-tokenizer alone; llama.cpp's "smollm" pre-tokenizer and
    SmolLM2's own tokenizer.json first split every digit off (``Digits(individual_digits=True)``). With this
    vocabulary (no multi-digit tokens) that changes the ids only where a run of 2+ whitespace characters precedes a
    digit ("a  2": ["a", "ĠĠ", "2"], transformers: ["a", "Ġ", "Ġ", "2"]); the second half pins exactly that."""
    pytest.importorskip("torch")
    import re

    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    texts = varied_strings()
    ref = AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)
    plain_ids = ref(texts)["input_ids"]
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref_ids = ref(texts)["input_ids"]
    got_ids = smollm_tokenizer(texts)["input_ids"]
    mismatched = [t for t, a, b in zip(texts, got_ids, ref_ids) if a != b]
    print(f"ids equal on {len(texts) - len(mismatched)}/{len(texts)} strings")
    assert not mismatched
    for text, ids in zip(texts, got_ids):
        assert smollm_tokenizer.decode(ids) == ref.decode(ids) == text
    differs = [t for t, a, b in zip(texts, got_ids, plain_ids) if a != b]
    assert differs and all(re.search(r"\s{2,}\d", t) for t in differs)
    assert all(a == b for t, a, b in zip(texts, got_ids, plain_ids) if not re.search(r"\s{2,}\d", t))
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(smollm_tokenizer, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name


def test_tokenizer_rejects_empty_input_with_one_line_errors(smollm_tokenizer):
    from jaxlin.data import DataError
    from jaxlin.models import Tokenizer

    tok = Tokenizer(smollm_tokenizer)
    with pytest.raises(DataError, match=r"no texts to tokenize .*pass at least one text"):
        tok([])
    with pytest.raises(DataError, match=r"max_length=0 .*pass max_length ≥ 1"):
        tok(["a text"], max_length=0)
    with pytest.raises(DataError, match=r"text 1 \(''\) has no tokens"):
        tok(["a text", ""])
    batch = tok(["a text", "and a longer text"], max_length=16)
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].sum(1).tolist() == [2, 4]


NO_TORCH = '''
import importlib.abc, sys

class HideTorch(importlib.abc.MetaPathFinder):
    """Wraps each finder so that torch is not found, as on the runtime-only install."""
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] == "torch" else self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):  # find_distributions, invalidate_caches
        return getattr(self.inner, attr)

sys.meta_path[:] = [HideTorch(f) for f in sys.meta_path]
try:
    import torch
    raise SystemExit("torch is still importable")
except ImportError:
    pass
import numpy as np
from jaxlin.models import load_pretrained

model = load_pretrained("SmolLM2-135M-Instruct", task="causal_lm")
batch = model.tokenizer(["The capital of France is", "Hi there"], max_length=16)
logits = np.asarray(model.apply(model.params, batch["input_ids"], batch["attention_mask"]))
assert logits.shape == batch["input_ids"].shape + (49152,) and np.isfinite(logits).all()
assert "torch" not in sys.modules
print("ids", batch["input_ids"][:, :6].tolist())
'''


@pytest.mark.slow
def test_smollm_loads_tokenizes_and_runs_without_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ids [[504, 3575, 282, 4649, 314, 2], [26843, 665, 2, 2, 2, 2]]" in done.stdout


SPM_PIECES = ["▁", "e", "t", "a", "o", "i", "n", "s", "h", "r", "l", "d", "c", "w", "u", "y", "▁t", "he", "▁the", "in",
              "▁a", "er", "an", "on", "▁in", "re", "at", "▁c", "▁cat", "▁h", "▁hat", "en", "▁w", "or", "ing", "▁wor",
              "ld", "▁world", "ll", "▁he", "llo", "▁hello", "▁s", "▁sat", "es", "ed", "▁on", "▁an", "▁and", "nd", "ou",
              "▁you", "▁y", "ea", "▁ea", "st", "▁st", "▁▁", "▁▁▁▁", "東", "京", "▁東京", "ç", "ü", "ber", "▁ü"]


def write_spm_gguf(path):
    """A llama GGUF whose tokenizer is SentencePiece BPE (``tokenizer.ggml.model = "llama"``): <unk>, <s>, </s>,
    256 byte-fallback tokens and a few scored pieces, without merges (llama.cpp's converter writes none)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    w = llama_gguf_writer(path)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))  # unknown, control, byte, normal
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), D), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.torch
def test_sentencepiece_gguf_tokenizer_matches_transformers_gguf(tmp_path):
    pytest.importorskip("torch")
    import gguf
    from transformers import AutoTokenizer

    from jaxlin.models.gguf_loader import gguf_tokenizer

    path = tmp_path / "spm.gguf"
    write_spm_gguf(path)
    ours = gguf_tokenizer(gguf.GGUFReader(path))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = varied_strings() + ["the cat sat on the hat", "hello  world", "<s>the</s>", "über 東京"]
    got, want = ours(texts)["input_ids"], ref(texts)["input_ids"]
    mismatched = [t for t, a, b in zip(texts, got, want) if a != b]
    print(f"SentencePiece ids equal on {len(texts) - len(mismatched)}/{len(texts)} strings")
    assert not mismatched
    assert all(ours.decode(ids) == ref.decode(ids) for ids in got)
    assert got[-4][:3] == [1, ours.convert_tokens_to_ids("▁the"), ours.convert_tokens_to_ids("▁cat")]  # bos added
