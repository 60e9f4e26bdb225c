"""GGUF reading: a tiny Llama written here the way llama.cpp's converter writes it (q/k rows permuted), read back
exactly; the model it loads against PyTorch transformers; and the packaged SmolLM2-135M-Instruct Q4_1 file
against transformers' own GGUF loader (which dequantizes with the same ``gguf`` package)."""
import time

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


def write_tiny_gguf(path, tensors):
    """What llama.cpp's convert_hf_to_gguf.py does for a Llama: metadata, then q/k rows permuted."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
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
    assert sorted(read) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)


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
