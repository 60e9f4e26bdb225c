"""Parameters sharded by rule on the 8 simulated devices: logits and per-module kernels equal the single-device
ones on every (data, model) mesh, shard bytes follow the rules, and checkpoints load slice by slice."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jaxlin import adapters, sharding, testing
from jaxlin.distributed import parse_mesh
from jaxlin.models import checkpoint, load_pretrained
from jaxlin.module_ntk import module_ntks
from tiers import tiered

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
# sizes that split over 2, 4 or 8 devices in places, and not in others (those stay replicated)
SIZES = {"bert": dict(vocab_size=208, hidden_size=40, intermediate_size=56),
         "gpt2": dict(vocab_size=104, n_embd=40, n_inner=48),
         "llama": dict(vocab_size=104, hidden_size=48, intermediate_size=40),
         "llama_tied": dict(vocab_size=104, intermediate_size=40),
         "qwen2": dict(vocab_size=104, intermediate_size=40),
         "mistral": dict(vocab_size=104, intermediate_size=40)}
TASK = {"bert": "classification", "gpt2": "causal_lm"}  # decoders: causal_lm, so the vocab axis is sharded


def mesh_of(shape):
    return parse_mesh(f"data={shape[0]},model={shape[1]}")


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def tiny(family, task=None, **kw):
    task = task or TASK.get(family, "causal_lm")
    return testing.tiny_model(family, task=task, num_labels=3 if task == "classification" else None,
                              **SIZES[family], **kw)


def cases(fast, families=tuple(SIZES)):
    """Llama on every mesh, every other family on the meshes with a model axis of 4 and 8; only ``fast`` in the
    fast tier (each case compiles for 8 devices). In every family the same leaves split over a model axis of 2 as
    of 4 (at 8 some stay whole), so for the others a model axis of 2, or of 1, repeats what 4 checks."""
    return tiered("family,shape", [(f, m) for f in families for m in MESHES if f == "llama" or m[1] >= 4], fast)


@pytest.mark.parametrize(*cases([("llama", (2, 4))]))
def test_sharded_logits_equal_single_device(family, shape):
    model = tiny(family)
    batch = testing.random_batch(model, batch=5, length=9, seed=1)
    ref = jax.jit(model.apply)(model.params, batch["input_ids"], batch["attention_mask"])
    mesh = mesh_of(shape)
    sharded = sharding.shard_model(model, mesh)
    shardings = sharding.param_shardings(model, mesh)
    jax.tree.map(lambda leaf, s: leaf.sharding.is_equivalent_to(s, leaf.ndim) or pytest.fail(f"{leaf.sharding}"),
                 sharded.params, shardings)
    got = jax.jit(sharded.apply)(sharded.params, batch["input_ids"], batch["attention_mask"])
    assert rel_err(got, ref) <= 1e-5


def _tp_only_divisor(size, m):
    return m if size % m == 0 else 1


@pytest.mark.parametrize(*tiered("shape", MESHES, [(2, 4)]))
def test_shard_bytes_shrink_with_the_model_axis_as_the_rules_say(shape):
    model = tiny("llama")  # hidden 48, q 4·6 = 24, kv 2·6 = 12, mlp 40, vocab 104
    mesh = mesh_of(shape)
    m = shape[1]
    tp_only = dict(sharding.DEFAULT_RULES, embed=None)
    placed = sharding.shard_model(model, mesh, tp_only).params
    flat = {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(placed).items()}
    expect = {  # leaf -> the dimension the model axis splits (TP only), None: replicated
        "layers/0/q_proj/kernel": 24, "layers/0/k_proj/kernel": 12, "layers/0/o_proj/kernel": 24,
        "layers/0/gate_proj/kernel": 40, "layers/0/down_proj/kernel": 40, "embed_tokens/embedding": 104,
        "layers/0/input_layernorm/scale": None, "norm/scale": None}
    for name, split in expect.items():
        leaf = flat[name]
        divisor = 1 if split is None else _tp_only_divisor(split, m)
        assert leaf.addressable_shards[0].data.nbytes == leaf.nbytes // divisor, name
    sizes = [sharding.bytes_per_device(model, mesh_of(s), tp_only) for s in MESHES]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # (8,1) … (1,8): the model axis grows
    # default rules (FSDP on embed too): the per-device total is what the placed shards hold
    placed = sharding.shard_model(model, mesh).params
    held = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(placed))
    assert sharding.bytes_per_device(model, mesh) == held
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(model.params))
    assert held < total


def test_lora_factors_follow_their_base_weight():
    model = tiny("llama", task="classification")
    adapted = adapters.adapt(model, lora=adapters.LoRA(("q_proj", "down_proj"), rank=2))
    mesh = mesh_of((2, 4))
    placed = sharding.shard_adapted(adapted, mesh)
    lora = placed.trainable["lora"]
    assert lora["layer0.self_attn.q_proj"]["a"].sharding.spec == P("data", None)  # embed → data
    assert lora["layer0.self_attn.q_proj"]["b"].sharding.spec == P(None, "model")  # heads → model
    assert lora["layer0.mlp.down_proj"]["a"].sharding.spec == P("model", None)  # mlp → model
    assert lora["layer0.mlp.down_proj"]["b"].sharding.spec == P(None, "data")
    kernel = placed.frozen["layers"][0]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P("data", "model")


def test_rules_fall_back_to_replicated_and_name_unknown_axes():
    mesh = mesh_of((2, 4))
    assert sharding.spec_for(("embed", "mlp"), (44, 37), mesh) == P("data", None)  # 37 % 4 ≠ 0
    assert sharding.spec_for(("embed", "embed"), (8, 8), mesh) == P("data", None)  # a mesh axis is used once
    with pytest.raises(ValueError, match="'experts'"):
        sharding.spec_for(("experts",), (8,), mesh)
    with pytest.raises(ValueError, match="LOGICAL_AXES"):
        sharding.leaf_axes("llama", ("layers", 0, "router", "kernel"), 2)


def _adapted(family):
    model = tiny(family, task="classification")
    targets = {"bert": ("query", "value"), "llama": ("q_proj", "v_proj")}[family]
    adapted = adapters.adapt(model, lora=adapters.LoRA(targets, rank=2, seed=1), head=True, biases=family == "bert",
                             modules=["layer1.mlp.down_proj"] if family == "llama" else None)
    keys = iter(jax.random.split(jax.random.key(5), 32))
    lora = {n: {"a": ab["a"], "b": 0.3 * jax.random.normal(next(keys), ab["b"].shape, ab["b"].dtype)}
            for n, ab in adapted.trainable["lora"].items()}  # b ≠ 0, so ∂f/∂A is not zero
    return dataclasses.replace(adapted, trainable={**adapted.trainable, "lora": lora})


@pytest.mark.parametrize(*cases([("llama", (4, 2))], families=("llama", "bert")))
def test_module_kernels_on_a_mesh_equal_single_device(family, shape):
    adapted = _adapted(family)
    batch = testing.random_batch(adapted.model, batch=7, length=9, seed=2)
    ref = module_ntks(adapted, batch, block_size=4)
    mesh = mesh_of(shape)
    placed = sharding.shard_adapted(adapted, mesh)
    got = module_ntks(placed, batch, block_size=4, mesh=mesh)
    assert list(got) == list(ref)
    scale = max(np.max(np.abs(k)) for k in ref.values())  # the key bias's kernel is zero up to rounding
    for name in ref:
        assert np.max(np.abs(got[name] - ref[name])) <= 1e-5 * scale, name


def _save_tiny_llama(directory):
    pytest.importorskip("torch")  # transformers writes the checkpoint through torch
    import transformers

    config = testing.tiny_config("llama", **SIZES["llama"])
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(directory)
    return directory


@pytest.mark.torch
@pytest.mark.slow  # torch writes the checkpoint
def test_load_pretrained_on_a_mesh_reads_only_owned_slices(tmp_path, monkeypatch):
    path = _save_tiny_llama(tmp_path / "llama")
    ref = load_pretrained(path, task="causal_lm")
    reads = []
    original = checkpoint.SafetensorsReader.read

    def spy(self, key, index=None):
        out = original(self, key, index)
        reads.append((key, out.shape))
        return out

    monkeypatch.setattr(checkpoint.SafetensorsReader, "read", spy)
    mesh = mesh_of((1, 8))
    model = load_pretrained(path, task="causal_lm", mesh=mesh)
    want = sharding.param_shardings(ref, mesh)
    for got, expected, s in zip(jax.tree.leaves(model.params), jax.tree.leaves(ref.params), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(s, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    q = [shape for key, shape in reads if key == "model.layers.0.self_attn.q_proj.weight"]
    assert q and all(shape == (24 // 8, 48) for shape in q)  # each device's slice, never the whole (24, 48)
    batch = testing.random_batch(ref, batch=3, length=7, seed=4)
    np.testing.assert_allclose(model.apply(model.params, **batch), ref.apply(ref.params, **batch), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_packaged_minilm_on_a_mesh_gives_the_same_logits():
    ref = load_pretrained("all-MiniLM-L6-v2", task="encoder")
    model = load_pretrained("all-MiniLM-L6-v2", task="encoder", mesh=mesh_of((2, 4)))
    sizes = {leaf.addressable_shards[0].data.nbytes < leaf.nbytes for leaf in jax.tree.leaves(model.params)}
    assert True in sizes  # some leaves are split
    batch = model.tokenizer(["a mesh of eight devices", "the same numbers"], max_length=16)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    got = jax.jit(model.apply)(model.params, ids, mask)
    want = jax.jit(ref.apply)(ref.params, ids, mask)
    assert rel_err(got, want) <= 1e-5
