"""Mixed precision (``model.dtype = "bfloat16"``, docs/scaling.md): bfloat16 base weights and activations, float32
heads, trainable leaves, optimiser state, logits, losses and kernels.

Tolerances come from bfloat16's 8-bit significand (7 stored bits and the implicit one): one rounding changes a
value by at most u = 2⁻⁸ relative. The tiny models below round their weights once and every activation a handful
of times through 2–3 residual blocks, so their outputs move by a few u; we allow 8u. A kernel K = J Jᵀ is a
product of two such Jacobians, so its error is about twice theirs; we allow 16u.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxlin import module_ntks
from jaxlin.adapters import LoRA, adapt
from jaxlin.cli import config_from_args, parser
from jaxlin.config import STAGES, ConfigError, preset
from jaxlin.plan import abstract_model, memory_plan
from jaxlin.testing import random_batch, tiny_model
from jaxlin.train import TrainConfig, fit, make_loss_fn

U = 2.0 ** -8  # bfloat16's unit roundoff
HEADS = ("classifier", "head_dense", "pooler", "score", "lm_head")  # attribute names of heads in params


def _pair(family, task, num_labels=None, **overrides):
    """A float32 tiny model and the bfloat16 model of the same weights (each leaf rounded to the dtype the
    bfloat16 build gives it)."""
    m32 = tiny_model(family, task=task, num_labels=num_labels, **overrides)
    m16 = tiny_model(family, task=task, num_labels=num_labels, dtype=jnp.bfloat16, **overrides)
    params = jax.tree.map(lambda a, b: a.astype(b.dtype), m32.params, m16.params)
    return m32, dataclasses.replace(m16, params=params)


def _rel_max(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _is_head(path) -> bool:
    return any(str(k).startswith(HEADS) for k in path)


@pytest.mark.parametrize("family,task,num_labels", [("roberta", "classification", 3), ("gpt2", "classification", 3),
                                                     ("llama", "causal_lm", None), ("llama_tied", "causal_lm", None)])
def test_bf16_model_is_within_a_few_roundings_of_float32(family, task, num_labels):
    m32, m16 = _pair(family, task, num_labels)
    flat = traverse_util.flatten_dict(m16.params)
    assert all(v.dtype == (jnp.float32 if _is_head(p) else jnp.bfloat16) for p, v in flat.items())
    batch = random_batch(m32, batch=5, length=11)
    want = m32.apply(m32.params, batch["input_ids"], batch["attention_mask"])
    first = m16.modules[0].name
    got, taps = m16.tapped_apply(m16.params, {}, batch["input_ids"], batch["attention_mask"], capture=(first,))
    assert taps[first].dtype == jnp.bfloat16  # the blocks compute in bfloat16 ...
    assert got.dtype == jnp.float32  # ... and the logits leave in float32
    err = _rel_max(got, want)
    assert 0 < err < 8 * U, err


def test_float32_and_float64_models_cast_nothing():
    m32 = tiny_model("bert", task="classification", num_labels=3)
    m64 = tiny_model("bert", task="classification", num_labels=3, dtype=jnp.float64)
    batch = random_batch(m32, batch=3, length=7)
    assert m32.apply(m32.params, batch["input_ids"], batch["attention_mask"]).dtype == jnp.float32
    params64 = jax.tree.map(lambda a: a.astype(jnp.float64), m32.params)  # an x64 reference of the float32 model
    assert m32.apply(params64, batch["input_ids"], batch["attention_mask"]).dtype == jnp.float64
    assert {v.dtype for v in jax.tree.leaves(m64.params)} == {jnp.dtype(jnp.float64)}


def _adapted16(**kw):
    _, m16 = _pair("roberta", "classification", 3, num_hidden_layers=2)
    return adapt(m16, lora=LoRA(("query", "value"), rank=2), **kw)  # float32 master copies by default


def _batch(model, n=7, seed=0):
    batch = random_batch(model, batch=n, length=11, seed=seed)
    labels = np.random.default_rng(seed).integers(0, 3, n).astype(np.int32)
    return {**batch, "labels": labels, "example_mask": np.ones(n, np.float32)}


def test_trainable_leaves_gradients_and_optimizer_state_stay_float32():
    adapted = _adapted16(head=True)
    trainable0 = adapted.trainable
    assert {v.dtype for v in jax.tree.leaves(trainable0)} == {jnp.dtype(jnp.float32)}
    apply_fn = adapted.as_function()
    batch = _batch(adapted.model)
    loss, aux = make_loss_fn(apply_fn)(trainable0, batch)
    assert loss.dtype == jnp.float32 and aux["logits"].dtype == jnp.float32
    grads = jax.grad(lambda t: make_loss_fn(apply_fn)(t, batch)[0])(trainable0)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    res = fit(apply_fn, trainable0, lambda epoch: [batch], config=TrainConfig(learning_rate=1e-2, steps=3),
              progress=False)
    assert {v.dtype for v in jax.tree.leaves(res.trainable)} == {jnp.dtype(jnp.float32)}
    floats = [v.dtype for v in jax.tree.leaves(res.opt_state) if jnp.issubdtype(v.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype(jnp.float32)}
    assert np.isfinite(res.train_loss).all() and res.train_loss[0] != res.train_loss[-1]
    assert {v.dtype for v in jax.tree.leaves(adapted.frozen)} == {jnp.dtype(jnp.bfloat16)}


def test_trainable_leaves_default_to_float32_master_copies():
    _, m16 = _pair("roberta", "classification", 3, num_hidden_layers=2)
    adapted = adapt(m16, lora=LoRA(("query", "value"), rank=2), head=True)
    assert {v.dtype for v in jax.tree.leaves(adapted.trainable)} == {jnp.dtype(jnp.float32)}
    assert {v.dtype for v in jax.tree.leaves(adapted.frozen)} >= {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("implementation", ["structured", "jacobian_contraction"])
def test_bf16_kernel_accumulates_in_float_and_is_close_to_float32(implementation):
    m32, m16 = _pair("roberta", "classification", 3, num_hidden_layers=2)
    lora = LoRA(("query", "value"), rank=2)
    a32, a16 = (adapt(m, lora=lora, dtype=jnp.float32) for m in (m32, m16))
    batch = random_batch(m32, batch=7, length=11)
    for accumulate in (np.float64, np.float32):
        k16 = module_ntks(a16, batch, implementation=implementation, accumulate_dtype=accumulate)
        assert {k.dtype for k in k16.values()} == {np.dtype(accumulate)}
    k32 = sum(module_ntks(a32, batch, implementation=implementation).values())
    k16 = sum(k16.values())
    err = float(np.linalg.norm(k16 - k32) / np.linalg.norm(k32))
    assert 0 < err < 16 * U, err


def test_plan_counts_bf16_base_weights_in_two_bytes_and_the_head_in_four():
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        config = preset("quick", dtype=dtype)
        flat = traverse_util.flatten_dict(abstract_model(config, 2).params)
        sizes[dtype] = {"base": sum(v.size for p, v in flat.items() if not _is_head(p)),
                        "head": sum(v.size for p, v in flat.items() if _is_head(p)),
                        "plan": memory_plan(config, num_classes=2).items}
    base, head = sizes["float32"]["base"], sizes["float32"]["head"]
    assert sizes["float32"]["plan"]["parameters"] == 4 * (base + head)
    assert sizes["bfloat16"]["plan"]["parameters"] == 2 * base + 4 * head
    assert sizes["bfloat16"]["plan"]["activations"] < sizes["float32"]["plan"]["activations"]


def test_config_and_flag_take_bfloat16_and_reject_other_dtypes():
    args = parser().parse_args(["run", "--preset", "quick", "--dtype", "bfloat16"])
    assert config_from_args(args, STAGES).model.dtype == "bfloat16"
    assert preset("quick").model.dtype == "float32"
    with pytest.raises(ConfigError) as e:
        preset("quick", dtype="float16x")
    message = str(e.value)
    assert "\n" not in message and all(s in message for s in ("'float16x'", "'float32'", "'bfloat16'", "--dtype"))


@pytest.mark.slow
def test_packaged_minilm_loads_in_bfloat16_with_a_float32_head():
    import jaxlin

    m32 = jaxlin.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2)
    m16 = jaxlin.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2, dtype="bfloat16")
    flat = traverse_util.flatten_dict(m16.params)
    assert all(v.dtype == (jnp.float32 if _is_head(p) else jnp.bfloat16) for p, v in flat.items())
    batch = m32.tokenizer(["a quiet, lovely morning", "this is the worst day", "fine"], max_length=16)
    want = m32.apply(m32.params, batch["input_ids"], batch["attention_mask"])
    got = m16.apply(m16.params, batch["input_ids"], batch["attention_mask"])
    assert got.dtype == jnp.float32 and _rel_max(got, want) < 8 * U
