"""`jaxlin.plan`: exact per-device parameter, trainable and optimiser bytes against arrays really placed on meshes
of the 8 simulated CPU devices, and `jaxlin plan` / `jaxlin run` refusing a plan that does not fit before any
compile (docs/scaling.md, "Will it fit? `jaxlin plan`")."""
import collections

import jax
import pytest

from jaxlin import cli, models, pipeline, plan as plan_mod, sharding
from jaxlin.backend import check_backend
from jaxlin.compilation import measure_compiles
from jaxlin.config import preset
from jaxlin.distributed import parse_mesh
from jaxlin.testing import tiny_config

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A directory with a tiny BERT's config.json and an EMPTY model.safetensors: the plan must read no weight."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_config("bert").save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")
    return path


def _config(checkpoint, **overrides):
    return preset("quick", model=str(checkpoint), targets="query,value", rank=4, **overrides)


def _held_per_device(tree) -> dict:
    """{device: bytes of `tree`'s placed arrays that device holds}, from the arrays' own shards."""
    held = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return held


@pytest.fixture(scope="module")
def tiny_real(tiny_checkpoint):
    """The run's model and adapted model with real (random) values: what the plan sizes from shapes alone."""
    config = _config(tiny_checkpoint)
    module = models.build_model(tiny_config("bert"), task="classification", num_labels=NUM_CLASSES, head="roberta")
    model = models.from_nnx(module, config=tiny_config("bert"), family="bert", task="classification")
    adapted, _ = pipeline.run_adapters(model, config)
    return config, model, adapted


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_parameter_and_trainable_bytes_are_those_each_device_holds(shape, tiny_real):
    config, model, adapted = tiny_real
    mesh = parse_mesh(f"data={shape[0]},model={shape[1]}")
    plan = plan_mod.memory_plan(config, mesh=mesh, num_classes=NUM_CLASSES, memory_bytes=2**40)
    params = _held_per_device(sharding.shard_model(model, mesh).params)
    trainable = _held_per_device(sharding.shard_adapted(adapted, mesh).trainable)
    assert set(params.values()) == {plan.items["parameters"]} == {sharding.bytes_per_device(model, mesh)}
    assert set(trainable.values()) == {plan.items["trainable"]}
    # Adam's two moments and the prox anchor θ0 (quick: regularizer prox, anchor init) are each one copy of the
    # trainable leaves, sharded like them; the rest is a few scalars (counts, λ, η)
    assert 0 <= plan.items["optimizer"] - 3 * plan.items["trainable"] < 1024
    assert plan.fits and plan.mesh == {"data": shape[0], "model": shape[1]}


def test_the_mesh_shrinks_parameters_as_the_rules_say(tiny_checkpoint, tiny_real):
    _, model, _ = tiny_real
    config = _config(tiny_checkpoint)
    bytes_on = {s: plan_mod.memory_plan(config, mesh=parse_mesh(s), num_classes=NUM_CLASSES,
                                        memory_bytes=2**40).items["parameters"]
                for s in ("data=8,model=1", "data=2,model=4")}
    whole = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(model.params))
    # width 36, MLP 53, vocabulary 211: no axis divides by 8, so (8, 1) keeps full copies (never padded); (2, 4)
    # splits the width over data and the heads over model
    assert bytes_on["data=8,model=1"] == whole
    assert bytes_on["data=2,model=4"] < whole / 2


def test_a_run_that_cannot_fit_is_refused_before_any_compile_or_load(tmp_path, capsys, monkeypatch):
    check_backend()  # the run's backend check compiles its canaries once per process: outside the meter
    monkeypatch.setattr(plan_mod, "device_memory", lambda device, sharing=1: (2**20, "test limit"))
    monkeypatch.setattr(pipeline, "setup", lambda *a, **k: pytest.fail("setup ran: the model was loaded"))
    with measure_compiles() as compiles:
        code = cli.main(["run", "--preset", "quick", "--stages", "ntk", "--block-size", "16",
                         "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and compiles.programs == 0
    assert len(err) == 1 and err[0].startswith("jaxlin: error: plan: the run needs")
    assert "--block-size (now 16)" in err[0] and "--mesh data axis" in err[0] and "1.0 MiB (test limit)" in err[0]


def test_plan_prints_the_table_and_refuses_in_one_line(capsys, monkeypatch):
    assert cli.main(["plan", "--preset", "quick"]) == 0
    out = capsys.readouterr().out
    for label in ("parameters", "optimizer state (adam)", "activations of one block", "kernel tile",
                  "device memory", "fits: the run needs"):
        assert label in out, out
    assert "estimate" in out and "exact" in out
    monkeypatch.setattr(plan_mod, "device_memory", lambda device, sharing=1: (2**20, "test limit"))
    assert cli.main(["plan", "--preset", "quick", "--stages", "ntk"]) == 2
    captured = capsys.readouterr()
    assert "does not fit" in captured.out and "optimizer state (none)" in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "--block-size (now 16)" in captured.err


def test_estimates_grow_with_the_block_and_split_over_the_data_axis(tiny_checkpoint):
    def plan(block, shape):
        config = _config(tiny_checkpoint, stages="ntk", block_size=block)
        return plan_mod.memory_plan(config, mesh=parse_mesh(shape), num_classes=NUM_CLASSES, memory_bytes=2**40)

    small, large, split = plan(4, "data=1,model=8"), plan(8, "data=1,model=8"), plan(8, "data=2,model=4")
    for item in plan_mod.ESTIMATED:
        assert small.items[item] < large.items[item], item
        assert split.items[item] < large.items[item], item  # each device builds half of a block's rows
    assert large.items["optimizer"] == 0 and large.optimizer == "none"  # no stage trains


def test_a_cpu_device_shares_host_ram_with_the_devices_the_run_uses(tiny_checkpoint):
    """Simulated CPU devices share the host's RAM: a run without a mesh uses one of the 8 and has all of it, a
    data=8 mesh gives each device an eighth."""
    config = _config(tiny_checkpoint, stages="ntk")
    alone = plan_mod.memory_plan(config, num_classes=NUM_CLASSES)
    spread = plan_mod.memory_plan(config, mesh=parse_mesh("data=8,model=1"), num_classes=NUM_CLASSES)
    assert alone.device_source.startswith("host RAM / 1 CPU") and spread.device_source.startswith("host RAM / 8 CPU")
    assert alone.device_bytes // 8 == spread.device_bytes
