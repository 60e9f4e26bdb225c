"""Tiny random decoder configs for tests: distinct prime-ish sizes so transposes cannot hide, GQA where the
family has it, head dims even (RoPE needs it), Llama with head_dim ≠ hidden/heads. (To be folded into ``jaxlin/testing.py``.)"""
from __future__ import annotations

PAD_ID = 0  # the pad token of every tiny config; tests keep it out of real tokens (HF's classification rule)


def tiny_decoder_config(kind: str):
    """A transformers config for ``kind`` in ("gpt2", "llama", "llama_tied", "qwen2", "mistral")."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if kind == "gpt2":
        return GPT2Config(vocab_size=97, n_positions=41, n_embd=36, n_layer=2, n_head=4, n_inner=43,
                          pad_token_id=PAD_ID, num_labels=3)
    common = dict(vocab_size=97, hidden_size=44, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=PAD_ID,
                  num_labels=3)
    if kind == "llama":
        return LlamaConfig(**common, head_dim=6, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    if kind == "llama_tied":
        return LlamaConfig(**dict(common, hidden_size=40, num_hidden_layers=2), tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**dict(common, hidden_size=56), rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 1000.0})
    if kind == "mistral":
        return MistralConfig(**dict(common, hidden_size=48), sliding_window=5)
    raise ValueError(f"unknown tiny decoder {kind!r}; use gpt2, llama, llama_tied, qwen2 or mistral")
