"""BERT/RoBERTa/MiniLM against PyTorch transformers (the oracle), and the loader's error cases."""
import json

import chex
import jax
import numpy as np
import pytest

import jaxlin.models as M
from jaxlin import testing
from jaxlin.models.checkpoint import CheckpointError


def rel_err(a, b, mask=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return np.abs(a - b).max() / np.abs(b).max()


def save_tiny(tmp_path, family, cls_name, **overrides):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    config = testing.tiny_config(family, **overrides)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.torch
@pytest.mark.parametrize("family,encoder_cls,cls_cls,head", [
    ("bert", "BertModel", "BertForSequenceClassification", "bert"),
    ("roberta", "RobertaModel", "RobertaForSequenceClassification", "roberta"),
])
def test_encoder_and_classifier_match_torch(tmp_path, family, encoder_cls, cls_cls, head):
    import torch

    ref = save_tiny(tmp_path / "enc", family, encoder_cls)
    model = M.load_pretrained(tmp_path / "enc", task="encoder")
    batch = testing.random_batch(model, batch=5, length=13)
    if family == "roberta":  # RoBERTa derives positions from pad tokens, so pads must be the pad id
        batch["input_ids"][batch["input_ids"] == model.config.pad_token_id] = 5
        batch["input_ids"] = np.where(batch["attention_mask"] == 1, batch["input_ids"], model.config.pad_token_id)
    ours = jax.jit(model.apply)(model.params, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(batch["input_ids"]).long(),
                     attention_mask=torch.tensor(batch["attention_mask"]).long()).last_hidden_state.numpy()
    assert rel_err(ours, theirs, batch["attention_mask"]) < 1e-5

    ref_cls = save_tiny(tmp_path / "cls", family, cls_cls, num_labels=3)
    clf = M.load_pretrained(tmp_path / "cls", task="classification", num_labels=3, head=head)
    assert clf.new_tensors == ()  # the head came from the checkpoint
    logits = clf.apply(clf.params, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        want = ref_cls(input_ids=torch.tensor(batch["input_ids"]).long(),
                       attention_mask=torch.tensor(batch["attention_mask"]).long()).logits.numpy()
    assert logits.shape == (5, 3)
    assert rel_err(logits, want) < 1e-5


@pytest.mark.torch
@pytest.mark.slow
def test_packaged_minilm_matches_torch():
    import torch
    import transformers

    model = M.load_pretrained("all-MiniLM-L6-v2", task="encoder")
    texts = ["The food was wonderful.", "A much longer sentence, with padding on the right of the shorter one!", "ok"]
    batch = model.tokenizer(texts, max_length=64)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["attention_mask"].sum(1).min() < 8
    ours = jax.jit(model.apply)(model.params, batch["input_ids"], batch["attention_mask"])
    ref = transformers.BertModel.from_pretrained(M.checkpoint.resolve("all-MiniLM-L6-v2").path).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(batch["input_ids"]).long(),
                     attention_mask=torch.tensor(batch["attention_mask"]).long()).last_hidden_state.numpy()
    assert rel_err(ours, theirs, batch["attention_mask"]) < 1e-4


def test_packaged_minilm_loads_as_classifier_with_new_seeded_head():
    a = M.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2, seed=3)
    b = M.load_pretrained("all-MiniLM-L6-v2", task="classification", num_labels=2, seed=3)
    assert a.new_tensors == ("classifier.bias", "classifier.weight")
    np.testing.assert_array_equal(a.params["classifier"]["kernel"], b.params["classifier"]["kernel"])
    assert a.module_names[:3] == ("layer0.attention.query", "layer0.attention.key", "layer0.attention.value")
    assert a.num_layers == 6


def test_padding_does_not_change_real_tokens():
    model = testing.tiny_model("bert")
    batch = testing.random_batch(model, batch=3, length=7)
    wider = {k: np.pad(v, ((0, 0), (0, 6))) for k, v in batch.items()}
    apply = jax.jit(model.apply)  # one compile per length instead of op-by-op dispatch
    a = apply(model.params, batch["input_ids"], batch["attention_mask"])
    b = apply(model.params, wider["input_ids"], wider["attention_mask"])
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[:, :7][mask], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ errors

def write_bert(tmp_path, **overrides):
    from safetensors.numpy import save_file

    from flax import nnx

    config = testing.tiny_config("bert", **overrides)
    tensors = {}
    abstract = M.build_model(config, task="encoder")
    for path, node in nnx.iter_modules(abstract):
        for attr, suffix, transform in getattr(node, "hf_params", lambda: [])():
            value = np.asarray(getattr(node, attr)[...])
            tensors[f"{node.hf_name}.{suffix}".removeprefix("bert.")] = np.ascontiguousarray(transform(value))
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tensors


def test_loader_reads_bare_backbone_and_sharded_index(tmp_path):
    from safetensors.numpy import save_file

    tensors = write_bert(tmp_path / "one")
    M.load_pretrained(tmp_path / "one", task="encoder")
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    keys = sorted(tensors)
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]}, str(shard / "a.safetensors"))
    save_file({k: tensors[k] for k in keys[half:]}, str(shard / "b.safetensors"))
    index = {"weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(keys)}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    one = M.load_pretrained(tmp_path / "one", task="encoder")
    two = M.load_pretrained(shard, task="encoder")
    chex.assert_trees_all_equal(one.params, two.params)


def test_checkpoint_errors_name_the_problem(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = write_bert(tmp_path / "ok")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    missing = dict(tensors)
    del missing["encoder.layer.1.attention.self.key.weight"]
    save_file(missing, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight.*missing"):
        M.load_pretrained(bad, task="encoder")
    wrong = dict(tensors)
    wrong["encoder.layer.0.intermediate.dense.weight"] = np.zeros((5, 36), np.float32)
    save_file(wrong, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"intermediate\.dense\.weight.*shape \(5, 36\), expected \(53, 36\)"):
        M.load_pretrained(bad, task="encoder")
    extra = dict(tensors, **{"encoder.layer.9.output.dense.weight": np.zeros((2, 2), np.float32)})
    save_file(extra, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not use.*encoder\.layer\.9"):
        M.load_pretrained(bad, task="encoder")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="t5")))
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises((CheckpointError, ValueError), match=r"t5"):
        M.load_pretrained(bad, task="encoder")
    assert load_file(str(tmp_path / "ok" / "model.safetensors"))


def test_pickles_are_refused_and_paths_checked(tmp_path):
    d = tmp_path / "torchdir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        M.load_pretrained(d, task="encoder")
    with pytest.raises(CheckpointError, match="pickle"):
        M.load_pretrained(d / "pytorch_model.bin", task="encoder")
    with pytest.raises(CheckpointError, match="does not exist"):
        M.load_pretrained(tmp_path / "nope.gguf", task="encoder")


def test_hub_id_offline_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot fetch 'someone/some-model'.*offline"):
        M.load_pretrained("someone/some-model", task="encoder")


def test_bad_task_and_labels():
    config = testing.tiny_config("bert")
    with pytest.raises(ValueError, match="task='generate'"):
        M.build_model(config, task="generate")
    with pytest.raises(ValueError, match="num_labels"):
        M.build_model(config, task="classification")
    with pytest.raises(ValueError, match="causal_lm.*not available"):
        M.build_model(config, task="causal_lm")
