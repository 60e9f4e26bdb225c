"""LoRA and parameter selection as pytree transforms; peft's on-disk format round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxlin.models as M
from jaxlin import testing
from jaxlin.adapters import LoRA, adapt, add_lora, load_peft, save_peft
from tiers import tiered


@pytest.fixture(scope="module")
def clf():
    return testing.tiny_model("roberta", task="classification", num_labels=3, seed=1)


@pytest.fixture(scope="module")
def batch(clf):
    b = testing.random_batch(clf, batch=4, length=9)
    b["input_ids"] = np.where(b["attention_mask"] == 1, np.maximum(b["input_ids"], 3), clf.config.pad_token_id)
    return b


def test_lora_at_init_is_bit_exact_and_grad_a_is_zero(clf, batch):
    ad = add_lora(clf, targets=("query", "value"), layers=(0, 2), rank=5, alpha=10, seed=7)
    assert ad.modules == ("layer0.attention.query", "layer0.attention.value", "layer2.attention.query",
                          "layer2.attention.value")
    base = jax.jit(clf.apply)(clf.params, batch["input_ids"], batch["attention_mask"])
    ours = jax.jit(ad.apply)(ad.trainable, ad.frozen, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(np.asarray(base), np.asarray(ours))

    def loss(tr):
        return jnp.sum(ad.apply(tr, ad.frozen, batch["input_ids"], batch["attention_mask"]) ** 2)

    grads = jax.jit(jax.grad(loss))(ad.trainable)
    for name in ad.modules:
        assert np.all(np.asarray(grads["lora"][name]["a"]) == 0.0)
        assert np.abs(np.asarray(grads["lora"][name]["b"])).max() > 0


def test_lora_init_conventions_and_seeding(clf):
    ad = add_lora(clf, rank=4, seed=3)
    a = np.asarray(ad.trainable["lora"]["layer1.attention.key"]["a"])
    assert a.shape == (36, 4) and np.abs(a).max() <= 1 / np.sqrt(36)
    assert np.all(np.asarray(ad.trainable["lora"]["layer1.attention.key"]["b"]) == 0)
    # A of a module does not depend on which other modules are adapted
    one = add_lora(clf, targets=("key",), layers=(1,), rank=4, seed=3)
    np.testing.assert_array_equal(a, one.trainable["lora"]["layer1.attention.key"]["a"])
    g = adapt(clf, lora=LoRA(("key",), rank=36, init="gaussian", seed=0))  # the largest rank: the width
    a = np.concatenate([np.asarray(v["a"]).ravel() for v in g.trainable["lora"].values()])
    assert abs(a.std() - 1 / 6) < 0.01
    assert add_lora(clf, seed=4).trainable["lora"]["layer0.attention.query"]["a"][0, 0] != \
        ad.trainable["lora"]["layer0.attention.query"]["a"][0, 0]


def test_merge_equals_apply_after_training_step(clf, batch):
    ad = add_lora(clf, rank=3, alpha=6, head=True)
    key = jax.random.key(0)
    trained = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(key, x.shape, x.dtype), ad.trainable)
    via_apply = ad.apply(trained, ad.frozen, batch["input_ids"], batch["attention_mask"])
    merged = ad.merge(trained)
    via_merge = clf.apply(merged, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(via_apply), np.asarray(via_merge), rtol=1e-5, atol=1e-6)  # float32
    q = clf.module("layer0.attention.query").path
    ab = trained["lora"]["layer0.attention.query"]
    want = traverse_util.flatten_dict(clf.params)[q + ("kernel",)] + 2.0 * ab["a"] @ ab["b"]
    np.testing.assert_allclose(traverse_util.flatten_dict(merged)[q + ("kernel",)], want, rtol=1e-6)
    assert not np.allclose(np.asarray(via_apply),
                           np.asarray(clf.apply(clf.params, batch["input_ids"], batch["attention_mask"])))


@pytest.mark.parametrize(*tiered("family,targets", [("bert", ("query", "value")), ("roberta", ("query", "key", "value")),
                                                    ("gpt2", ("c_attn", "c_proj")),
                                                    ("llama", ("q_proj", "v_proj", "down_proj"))],
                                  [("roberta", ("query", "key", "value"))]))
def test_unmerged_lora_equals_merged_with_its_gradients(family, targets):
    """apply runs x·W + s·(x·A)·B; it equals the model at merged weights W + s·A·B, and so do the gradients
    w.r.t. A and B (float64, random A and B)."""
    model = testing.tiny_model(family, dtype=jnp.float64, seed=2)
    b = testing.random_batch(model, batch=3, length=7)
    ids, mask = b["input_ids"], b["attention_mask"]
    ad = adapt(model, lora=LoRA(targets, rank=3, alpha=5), biases=True)
    np.testing.assert_array_equal(np.asarray(ad.apply(ad.trainable, ad.frozen, ids, mask)),
                                  np.asarray(model.apply(model.params, ids, mask)))
    keys = iter(jax.random.split(jax.random.key(3), 1000))
    theta = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), ad.trainable)
    cot = jax.random.normal(jax.random.key(4), np.shape(model.apply(model.params, ids, mask)), jnp.float64)
    unmerged = lambda t: jnp.vdot(cot, ad.apply(t, ad.frozen, ids, mask))  # noqa: E731
    merged = lambda t: jnp.vdot(cot, model.apply(ad.merge(t), ids, mask))  # noqa: E731
    out_u, out_m = jax.jit(ad.apply)(theta, ad.frozen, ids, mask), jax.jit(model.apply)(ad.merge(theta), ids, mask)
    assert np.abs(np.asarray(out_u - out_m)).max() <= 1e-12 * np.abs(np.asarray(out_m)).max()
    assert not np.allclose(np.asarray(out_u), np.asarray(model.apply(model.params, ids, mask)))
    g_u, g_m = jax.jit(jax.grad(unmerged))(theta), jax.jit(jax.grad(merged))(theta)
    scale = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(g_m))
    for (path, gu), gm in zip(jax.tree_util.tree_leaves_with_path(g_u), jax.tree.leaves(g_m)):
        # A and B leaf by leaf; biases against the whole gradient (a key bias's is zero up to rounding)
        ref = np.abs(np.asarray(gm)).max() if path[0].key == "lora" else scale
        assert np.abs(np.asarray(gu - gm)).max() <= 1e-12 * ref, path


def test_unmerged_step_forms_no_merged_weight(clf, batch):
    """The gradient of an unmerged LoRA loss contains no d_in × d_out product A·B (nor its cotangent)."""
    ad = add_lora(clf, targets=("query",), layers=(1,), rank=3)
    d = clf.module("layer1.attention.query").d_in

    def loss(t):
        return jnp.sum(ad.apply(t, ad.frozen, batch["input_ids"], batch["attention_mask"]) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(ad.trainable)
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if eqn.primitive.name == "dot_general"]
    assert (d, d) not in shapes and (1, d, d) not in shapes


def test_selections_pick_exactly_the_named_parameters(clf):
    flat = traverse_util.flatten_dict(clf.params)
    layer = adapt(clf, layers=(1,))
    picked = set(traverse_util.flatten_dict(layer.trainable["params"]))
    assert picked == {p for p in flat if p[:2] == ("layers", 1)}
    assert not picked & set(traverse_util.flatten_dict(layer.frozen))
    assert len(picked) + len(traverse_util.flatten_dict(layer.frozen)) == len(flat)
    assert "layer1.attention.query" in layer.modules and "layer1.attn_norm" in layer.modules

    bitfit = adapt(clf, biases=True)
    assert all(p[-1] == "bias" for p in traverse_util.flatten_dict(bitfit.trainable["params"]))
    assert len(traverse_util.flatten_dict(bitfit.trainable["params"])) == sum(p[-1] == "bias" for p in flat)

    head = adapt(clf, head=True)
    assert head.modules == ("classifier.dense", "classifier.out_proj")
    assert set(traverse_util.flatten_dict(head.trainable["params"])) == {
        ("head_dense", "kernel"), ("head_dense", "bias"), ("classifier", "kernel"), ("classifier", "bias")}

    both = adapt(clf, lora=LoRA(("value",), rank=2), modules=("intermediate.dense",), head=True)
    assert both.modules[:3] == ("layer0.attention.value", "layer0.intermediate.dense", "layer1.attention.value")
    assert both.num_params("layer0.attention.value") == 2 * (36 + 36)
    assert both.num_params("layer0.intermediate.dense") == 36 * 53 + 53


def test_selection_errors_name_the_fix(clf):
    with pytest.raises(ValueError, match=r"'q_proj' matches no module.*'query'"):
        add_lora(clf, targets=("q_proj",))
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist.*0\.\.2"):
        add_lora(clf, layers=(7,))
    with pytest.raises(ValueError, match="rank=0"):
        add_lora(clf, rank=0)
    with pytest.raises(ValueError, match="nothing is selected"):
        adapt(clf)
    with pytest.raises(ValueError, match="no head"):
        adapt(testing.tiny_model("bert"), head=True)


def test_peft_export_import_roundtrip(clf, batch, tmp_path):
    ad = add_lora(clf, targets=("query", "value"), rank=4, alpha=8, head=True)
    trained = jax.tree_util.tree_map(lambda x: x + 0.03, ad.trainable)
    save_peft(ad, tmp_path / "adapter", trained)
    back = load_peft(clf, tmp_path / "adapter")
    assert back.modules == ad.modules
    a = ad.apply(trained, ad.frozen, batch["input_ids"], batch["attention_mask"])
    b = back.apply(back.trainable, back.frozen, batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no peft form"):
        save_peft(adapt(clf, biases=True), tmp_path / "bitfit")


@pytest.mark.torch
def test_peft_in_pytorch_loads_what_jaxlin_trained(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    config = testing.tiny_config("roberta", num_labels=3)
    transformers.RobertaForSequenceClassification(config).eval().save_pretrained(tmp_path / "base")
    model = M.load_pretrained(tmp_path / "base", task="classification", num_labels=3)
    ad = add_lora(model, targets=("query", "key", "value"), layers=(0, 2), rank=4, alpha=8, head=True, seed=2)
    key = iter(jax.random.split(jax.random.key(1), 100))
    trained = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(key), x.shape, x.dtype),
                                     ad.trainable)
    save_peft(ad, tmp_path / "adapter", trained, base_model_name_or_path=str(tmp_path / "base"))
    base = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    pt = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = testing.random_batch(model, batch=4, length=9)
    batch["input_ids"] = np.where(batch["attention_mask"] == 1, np.maximum(batch["input_ids"], 3), 1)
    with torch.no_grad():
        want = pt(input_ids=torch.tensor(batch["input_ids"]).long(),
                  attention_mask=torch.tensor(batch["attention_mask"]).long()).logits.numpy()
    got = ad.apply(trained, ad.frozen, batch["input_ids"], batch["attention_mask"])
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.torch
def test_peft_loads_a_llama_adapter_jaxlin_trained(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(testing.tiny_config("llama")).eval().save_pretrained(tmp_path / "base")
    model = M.load_pretrained(tmp_path / "base", task="causal_lm")
    ad = add_lora(model, targets=("q_proj", "v_proj", "down_proj"), layers=(0, 2), rank=4, alpha=16, seed=5)
    key = iter(jax.random.split(jax.random.key(3), 100))
    trained = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(key), x.shape, x.dtype),
                                     ad.trainable)
    save_peft(ad, tmp_path / "adapter", trained)
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    pt = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = testing.random_batch(model, batch=3, length=7)
    with torch.no_grad():
        want = pt(input_ids=torch.tensor(batch["input_ids"]).long(),
                  attention_mask=torch.tensor(batch["attention_mask"]).long()).logits.numpy()
    got = np.asarray(ad.apply(trained, ad.frozen, batch["input_ids"], batch["attention_mask"]))
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(got[mask] - want[mask]).max() / np.abs(want[mask]).max() < 1e-5


@pytest.mark.torch
def test_peft_names_modules_for_the_model_class(tmp_path):
    """An encoder-task adapter loads onto AutoModel (bare names, encoder.layer.0…) by default, and onto
    AutoModelForSequenceClassification (bert.encoder.layer.0…) when asked; jaxlin reads both back."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    transformers.BertModel(testing.tiny_config("bert")).eval().save_pretrained(tmp_path / "base")
    model = M.load_pretrained(tmp_path / "base", task="encoder")
    ad = add_lora(model, targets=("query", "value"), layers=(0, 2), rank=4, alpha=8, seed=2)
    key = iter(jax.random.split(jax.random.key(4), 100))
    trained = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(next(key), x.shape, x.dtype),
                                     ad.trainable)
    batch = testing.random_batch(model, batch=3, length=9)
    got = np.asarray(ad.apply(trained, ad.frozen, batch["input_ids"], batch["attention_mask"]))
    ids, mask = (torch.tensor(batch[k]).long() for k in ("input_ids", "attention_mask"))
    for model_class, auto in (("AutoModel", transformers.AutoModel),
                              ("AutoModelForSequenceClassification", transformers.AutoModelForSequenceClassification)):
        out = save_peft(ad, tmp_path / model_class, trained, model_class=None if auto is transformers.AutoModel
                        else model_class)
        pt = peft.PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"), out).eval()
        backbone = pt.base_model.model if auto is transformers.AutoModel else pt.base_model.model.bert
        with torch.no_grad():
            want = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        real = batch["attention_mask"].astype(bool)
        assert np.abs(got[real] - want[real]).max() / np.abs(want[real]).max() < 1e-5, model_class
        back = load_peft(model, out)
        np.testing.assert_allclose(np.asarray(back.apply(back.trainable, back.frozen, batch["input_ids"],
                                                         batch["attention_mask"])), got, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="model_class='AutoModelForSeqClassification' is not one of"):
        save_peft(ad, tmp_path / "x", model_class="AutoModelForSeqClassification")


def test_as_function_is_a_pytree_of_its_frozen_weights_and_gate(clf, batch):
    ad = add_lora(clf, targets=("query",), rank=2, head=True)
    f = ad.as_function()
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert len(jax.tree.leaves(f)) == len(jax.tree.leaves(ad.frozen))
    np.testing.assert_array_equal(np.asarray(f(ad.trainable, x)),
                                  np.asarray(ad.apply(ad.trainable, ad.frozen, x["input_ids"], x["attention_mask"])))
    gated = ad.as_function(gate=[1.0, 0.0, 1.0])
    assert len(jax.tree.leaves(gated)) == len(jax.tree.leaves(ad.frozen)) + 1
    np.testing.assert_array_equal(np.asarray(gated(ad.trainable, x)), np.asarray(f(ad.trainable, x)))
    grads = jax.jit(jax.grad(lambda t: jnp.sum(gated(t, x) ** 2)))(ad.trainable)
    assert np.all(np.asarray(grads["lora"]["layer1.attention.query"]["b"]) == 0)
    assert np.abs(np.asarray(grads["lora"]["layer0.attention.query"]["b"])).max() > 0
    with pytest.raises(ValueError, match="one per LoRA module"):
        ad.as_function(gate=[1.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="has none"):
        adapt(clf, head=True).as_function(gate=[])
