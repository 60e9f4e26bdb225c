"""Kernels from a frozen prefix (`module_ntks(start_layer=)`) equal the whole model's, and the κ study's kernel
passes share the runs' prefix: the blocks below the lowest candidate run once per example for kernels and runs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlin
from jaxlin import data, study
from jaxlin.adapters import add_lora
from jaxlin.module_ntk import module_ntks
from jaxlin.ntk import empirical_ntk_fn
from jaxlin.prefix import FrozenPrefix, frozen_prefix
from jaxlin.testing import random_batch, tiny_model
from test_study import WordTokenizer, _config, _dataset
from word_tokenizer import word_tokenizer


def _assert_kernels_equal(got, want):
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for name in w:
            np.testing.assert_allclose(g[name], w[name], rtol=0, atol=1e-12 * np.abs(w[name]).max(), err_msg=name)


def test_module_kernels_from_a_prefix_equal_the_whole_models():
    """A causal LM read through label words, LoRA on blocks 1 and 2, two seeds in one pass (B0 = 0): the kernels
    of batches carrying the hidden states entering block 1, padded wider than the prefix's rows and than each
    other, equal those of the whole model; so do one seed's alone and the structured eNTK of the prefix's function."""
    model = tiny_model("llama", task="causal_lm", dtype=jnp.float64)
    readout = jaxlin.label_word_readout(word_tokenizer(), ["bad", "good"], template="Review: {text} Sentiment:")
    seeds = [add_lora(model, targets=("q_proj", "v_proj"), layers=(1, 2), rank=2, seed=s) for s in (0, 1)]
    adapted = seeds[0]
    prefix = frozen_prefix(adapted.as_function(readout.output_fn), adapted.trainable, length=8, rows=4)
    assert prefix.start_layer == 1
    x1, x2 = random_batch(model, 7, 11, seed=1), random_batch(model, 5, 6, seed=2)
    wide = {k: np.pad(v, ((0, 0), (0, 5))) for k, v in x1.items()}  # 16 tokens, right padding
    kw = dict(trace_axes=(), output_fn=readout.output_fn, block_size=3, trainable=[a.trainable for a in seeds])
    want = module_ntks(adapted, x1, x2, **kw)
    got = module_ntks(adapted, prefix.attach(wide), prefix.attach(x2), start_layer=1, **kw)
    _assert_kernels_equal(got, want)
    assert prefix.num_cached == 12  # each example's blocks below computed once
    summed = jax.jit(empirical_ntk_fn(prefix.function, trace_axes=(), implementation="structured"))  # its f alone
    total = sum(want[0].values())
    np.testing.assert_allclose(summed(prefix.attach(x1), prefix.attach(x2), adapted.trainable), total, rtol=0,
                               atol=1e-12 * np.abs(total).max())
    one = module_ntks(adapted, prefix.attach(x1), start_layer=1, **{**kw, "trainable": seeds[1].trainable})
    _assert_kernels_equal([one], [module_ntks(adapted, x1, **{**kw, "trainable": seeds[1].trainable})])
    with pytest.raises(ValueError, match=r"batch1 must be a mapping with .*'prefix_hidden_BLD'.*FrozenPrefix.attach"):
        module_ntks(adapted, x1, start_layer=1, **kw)
    with pytest.raises(ValueError, match=r"lie below start_layer=2"):
        module_ntks(adapted, prefix.attach(x1), start_layer=2, **kw)


def test_the_study_computes_its_kernels_from_the_runs_prefix(monkeypatch):
    """Candidates on blocks 1 and 2 of a tiny BERT, two seeds, the kernel batches padded to 8 tokens and the
    training batches to 16: with the frozen prefix the calibration and cross kernels run from block 1 and equal
    the whole model's, and so do the statistics, the KRR predictor and every run; block 1's prefix forward ran
    once per example for f0, the kernels and the runs together, and block 2's ran on from its rows."""
    model = tiny_model("bert", task="classification", num_labels=2, dtype=jnp.float64)
    train, ev = _dataset(40, 0), _dataset(16, 1)
    config = _config(configurations={"a": ("layer1.attention.query",),
                                     "b": ("layer2.attention.value", "layer2.attention.key")},
                     layers=(1, 2), kernels=("ntk",), pad_to_multiple_of=16, selection_budget=1,
                     train_selections=False)
    calls, computed = [], []  # (start_layer, kernels) of each module_ntks call; (block, keys) of each prefix forward
    ntks, compute = study.module_ntks, FrozenPrefix._compute
    monkeypatch.setattr(study, "module_ntks", lambda *a, **k: (calls.append((k["start_layer"], r := ntks(*a, **k))),
                                                               r)[1])
    monkeypatch.setattr(FrozenPrefix, "_compute", lambda self, ids, lengths, keys: (
        computed.append((self.start_layer, keys)), compute(self, ids, lengths, keys))[1])
    whole, prefixed = (study.run_study(model, train, ev, dataclasses.replace(config, frozen_prefix=on),
                                       tokenizer=WordTokenizer(), progress=False) for on in (False, True))
    assert [start for start, _ in calls] == [0, 0, 1, 1]  # the calibration kernels, the cross kernels
    for (_, got), (_, want) in zip(calls[2:], calls[:2]):
        _assert_kernels_equal(got, want)
    assert [r["prefix_start_layer"] for r in prefixed["runs"]] == [1, 2] * 2
    for got, want in zip(prefixed["runs"], whole["runs"]):
        for key in ("krr_eval_accuracy", "krr_agreement", "eval_accuracy"):
            assert got[key] == want[key], key
        np.testing.assert_allclose(got["train_loss_curve"], want["train_loss_curve"], rtol=1e-10)
        for name, value in want["statistics"].items():
            assert got["statistics"][name] == pytest.approx(value, rel=1e-6), name

    def examples(*datasets):  # real token ids of each example
        return {b["input_ids"][i, :b["attention_mask"][i].sum()].tobytes() for d in datasets
                for b in [data.encode(d, WordTokenizer(), max_length=16)] for i in range(len(d))}

    # block 1 once per example of f0, both kernel passes and the runs; block 2 once per run example, from block 1
    trained = train.subset(np.arange(config.num_train))
    want = {1: examples(trained, ev, data.calibration_subset(train, config.num_calibration_large)),
            2: examples(trained, ev)}
    assert {start for start, _ in computed} == {1, 2}
    for block, keys in want.items():
        found = [k for start, ks in computed if start == block for k in ks]
        assert len(found) == len(set(found)) and set(found) == keys, block
