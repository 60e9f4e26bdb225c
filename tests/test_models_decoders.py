"""GPT-2 and Llama-family decoders (Llama untied/tied, Qwen2 with q/k/v bias, Mistral with a sliding window)
against PyTorch transformers on random tiny checkpoints, with right and left padding.

The batch's padding uses ``config.pad_token_id`` and real tokens never do, so HF's classification rule (the
rightmost token that is not the pad id) and jaxlin's (the rightmost token the attention mask keeps) agree.
"""
import numpy as np
import pytest
from transformers import GPTNeoXConfig

from jaxlin.models import CheckpointError, build_model, load_pretrained
from jaxlin.testing import PAD_ID, tiny_decoder_config
from jaxlin.models.llama import rope_inv_freq
from tiers import tiered

KINDS = ("gpt2", "llama", "llama_tied", "qwen2", "mistral")
LENGTHS = (9, 6, 5)  # full, right-padded, left-padded
TOL = 1e-4


def padded_batch():
    rng = np.random.default_rng(7)
    ids = rng.integers(PAD_ID + 1, 97, size=(3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, LENGTHS[1]:] = 0  # right padding
    mask[2, : 9 - LENGTHS[2]] = 0  # left padding
    return np.where(mask == 1, ids, PAD_ID), mask


def rel_err(got, ref):
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


def randomize(model, torch):
    """HF's init leaves biases at 0 and norms at 1; draw every parameter so each tensor's mapping matters."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (config, causal-LM dir, classification dir), each saved as safetensors by PyTorch transformers."""
    torch = pytest.importorskip("torch")
    import transformers

    out = {}
    for kind in KINDS:
        config = tiny_decoder_config(kind)
        torch.manual_seed(0)
        lm = transformers.AutoModelForCausalLM.from_config(config).eval()
        randomize(lm, torch)
        lm_dir, cls_dir = tmp_path_factory.mktemp(f"{kind}_lm"), tmp_path_factory.mktemp(f"{kind}_cls")
        lm.save_pretrained(lm_dir)
        cls = transformers.AutoModelForSequenceClassification.from_pretrained(lm_dir).eval()
        torch.nn.init.normal_(cls.score.weight, std=0.5)
        cls.save_pretrained(cls_dir)
        out[kind] = (config, lm_dir, cls_dir)
    return out


@pytest.mark.torch
@pytest.mark.parametrize(*tiered("kind", KINDS, ["llama"]))
def test_decoder_matches_transformers(kind, checkpoints):
    torch = pytest.importorskip("torch")
    import transformers

    config, lm_dir, cls_dir = checkpoints[kind]
    ids, mask = padded_batch()
    real = mask.astype(bool)
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    hf_lm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    hf_cls = transformers.AutoModelForSequenceClassification.from_pretrained(cls_dir).eval()
    with torch.no_grad():
        ref_logits = hf_lm(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
        ref_hidden = hf_lm.base_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
        ref_cls = hf_cls(input_ids=t_ids, attention_mask=t_mask).logits.numpy()

    lm = load_pretrained(lm_dir, task="causal_lm")
    enc = load_pretrained(lm_dir, task="encoder")
    cls = load_pretrained(cls_dir, task="classification")
    errors = {
        "causal_lm": rel_err(np.asarray(lm.apply(lm.params, ids, mask))[real], ref_logits[real]),
        "encoder": rel_err(np.asarray(enc.apply(enc.params, ids, mask))[real], ref_hidden[real]),
        "classification": rel_err(cls.apply(cls.params, ids, mask), ref_cls),
    }
    print(kind, errors)
    assert max(errors.values()) <= TOL, errors
    assert cls.new_tensors == () and lm.new_tensors == ()
    assert lm.family == ("gpt2" if kind == "gpt2" else "llama") and lm.num_layers == config.num_hidden_layers


@pytest.mark.torch
def test_module_names_and_paths(checkpoints):
    llama = load_pretrained(checkpoints["llama"][1], task="causal_lm")
    q = llama.module("layer1.self_attn.q_proj")
    assert (q.hf_name, q.path[:2], q.d_in, q.d_out, q.has_bias) == (
        "model.layers.1.self_attn.q_proj", ("layers", 1), 44, 24, False)
    assert llama.module("lm_head").layer is None  # untied: a Linear of its own
    qwen = load_pretrained(checkpoints["qwen2"][1], task="causal_lm")
    assert qwen.module("layer0.self_attn.k_proj").has_bias and not qwen.module("layer0.self_attn.o_proj").has_bias
    gpt2 = load_pretrained(checkpoints["gpt2"][1], task="encoder")
    assert gpt2.module("layer1.attn.c_attn").hf_name == "transformer.h.1.attn.c_attn"
    assert [m.projection for m in gpt2.modules[:4]] == ["c_attn", "c_proj", "c_fc", "c_proj"]


@pytest.mark.torch
@pytest.mark.parametrize(*tiered("kind", ("gpt2", "llama_tied"), ["gpt2"]))
def test_missing_classification_head_is_initialised(kind, checkpoints):
    lm_dir = checkpoints[kind][1]
    ids, mask = padded_batch()
    a = load_pretrained(lm_dir, task="classification", num_labels=3, seed=1)
    b = load_pretrained(lm_dir, task="classification", num_labels=3, seed=1)
    assert a.new_tensors == ("score.weight",)
    logits = np.asarray(a.apply(a.params, ids, mask))
    assert logits.shape == (3, 3) and np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, b.apply(b.params, ids, mask))  # seeded, so reproducible


@pytest.mark.torch
@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(rope):
    pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny_decoder_config("llama")
    config.rope_parameters = rope
    ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    np.testing.assert_allclose(rope_inv_freq(config, 6), ref.numpy(), rtol=1e-6)


def test_unknown_rope_type_is_rejected():
    config = tiny_decoder_config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match=r"rope_type='dynamic'.*\('default', 'linear', 'llama3'\)"):
        build_model(config, task="causal_lm")


def test_unsupported_model_type_lists_supported(tmp_path):
    from safetensors.numpy import save_file

    GPTNeoXConfig(vocab_size=31, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=16).save_pretrained(tmp_path)
    save_file({"gpt_neox.embed_in.weight": np.zeros((31, 8), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model_type='gpt_neox'.*'gpt2'.*'llama'.*'qwen2'"):
        load_pretrained(tmp_path, task="causal_lm")


def test_decoders_reject_encoder_heads():
    with pytest.raises(ValueError, match="head='roberta'.*leave head=None"):
        build_model(tiny_decoder_config("gpt2"), task="classification", num_labels=2, head="roberta")


@pytest.mark.torch
def test_jitted_apply_and_taps(checkpoints):
    import jax
    import jax.numpy as jnp

    model = load_pretrained(checkpoints["mistral"][1], task="classification", num_labels=2)
    ids, mask = padded_batch()
    import chex

    chex.clear_trace_counter()  # chex counts traces per function footprint, kept across tests
    apply = jax.jit(chex.assert_max_traces(model.apply, n=1))  # a second call with the same shapes would raise
    first = apply(model.params, ids, mask)
    eager = model.apply(model.params, ids, mask)  # float32: jit may reorder sums, so compare at the output's scale
    np.testing.assert_allclose(apply(model.params, ids, mask), eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())
    assert first.shape == (3, 2)
    name = "layer1.mlp.down_proj"  # a zero probe changes nothing, and the module's input is captured
    probe = {name: jnp.zeros((3, 9, model.module(name).d_out), jnp.float32)}
    out, inputs = model.tapped_apply(model.params, probe, ids, mask, capture=(name,))
    np.testing.assert_allclose(out, first, rtol=1e-5, atol=1e-5 * np.abs(first).max())
    assert inputs[name].shape == (3, 9, model.module(name).d_in)
