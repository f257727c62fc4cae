"""Configs: defaults, strict loading, overrides, profiles, and the hash that keys the store."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from emq.config import (
    PROFILES,
    ConfigError,
    CoresetConfig,
    DataConfig,
    ModelConfig,
    QuantConfig,
    RunConfig,
    TrainConfig,
    flat_keys,
    from_dict,
    load_config,
)

# a different, valid value for every key whose values are a closed set of choices
OTHER_CHOICE = {"quant.norm": "shared", "quant.correction": "mean", "quant.fp_act": "clamp",
                "train.distill": "hard", "train.bits": (2, 3), "quant.weight_quantizer": "lsq",
                "quant.act_quantizer": "qil", "train.progressive": "bits",
                "coreset.score": "loss", "coreset.mode": "lightweight",
                "model.arch": "vit_tiny", "train.amp": "bf16", "train.channels_last": "on", "train.compile": "off",
                "data.name": "imagenet", "model.block": "any_precision", "train.optimizer": "adam",
                "train.schedule": "step", "train.milestones": (0.25,)}
# keys whose other value needs another key changed with it to be valid
COMPANIONS = {"model.block": {"model.preact": True}}


def get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def another_value(key: str, value):
    """A valid value of ``key`` different from ``value``."""
    if key in OTHER_CHOICE:
        return OTHER_CHOICE[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "_other"
    raise AssertionError(f"no alternative for {key}={value!r}")


# ---- defaults and round trips --------------------------------------------------------------------
def test_defaults_are_the_documented_ones():
    cfg = RunConfig()
    assert cfg.data == DataConfig() and cfg.data.name == "fashion_mnist"
    assert cfg.train.bits == (2, 4, 8, 32) and cfg.train.distill == "recursive"
    assert cfg.quant.norm == "switchable" and cfg.quant.correction == "none"
    assert cfg.quant.quantize_first_last is False
    assert cfg.model == ModelConfig(arch="resnet", depth=20, width=1.0, preact=False)
    assert load_config() == cfg


def test_defaults_round_trip_through_to_dict_and_from_dict():
    cfg = RunConfig()
    assert from_dict(cfg.to_dict()) == cfg
    # also through JSON, where the tuple of bits becomes a list
    again = from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.hash() == cfg.hash()
    assert isinstance(again.train.bits, tuple)


def test_a_non_default_config_round_trips_too():
    cfg = RunConfig().with_overrides({k: another_value(k, get(RunConfig(), k)) for k in flat_keys()})
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_missing_keys_take_their_defaults():
    assert from_dict({}) == RunConfig()
    assert from_dict({"train": {"epochs": 3}}) == RunConfig(train=TrainConfig(epochs=3))


def test_flat_keys_name_every_field():
    keys = flat_keys()
    assert "train.epochs" in keys and "quant.correction" in keys and "data.root" in keys
    assert len(keys) == sum(len(dataclasses.fields(c)) for c in (DataConfig, ModelConfig, QuantConfig, TrainConfig,
                                                                          CoresetConfig))


# ---- hash --------------------------------------------------------------------------------------------
def test_hash_is_12_hex_digits_of_the_sha256_of_the_canonical_json_of_non_default_fields():
    cfg = load_config(overrides=["train.epochs=3", "quant.norm=shared"])
    assert cfg.non_default() == {"quant": {"norm": "shared"}, "train": {"epochs": 3}}
    blob = json.dumps(cfg.non_default(), sort_keys=True, separators=(",", ":"))
    assert cfg.hash() == hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert len(cfg.hash()) == 12 and int(cfg.hash(), 16) >= 0


def test_a_run_stored_before_a_field_was_added_keeps_its_hash_and_folder(tmp_path):
    """config.json of an older run lacks fields added since; their defaults fill them in."""
    from emq.results import ResultsStore, write_json

    cfg = load_config(overrides=["train.epochs=3"])
    folder = tmp_path / "runs" / cfg.hash()
    old = cfg.to_dict()
    del old["quant"]["scale_by_mean"]  # as if the field did not exist when the run was made
    write_json(folder / "config.json", old)
    assert ResultsStore(tmp_path).run(cfg).path == folder


def test_every_stored_run_keeps_its_hash_and_folder_name():
    """Fields added since (the coreset section among them) default to the old behaviour, so
    every run folder of the committed results store is still found under its config's hash."""
    from emq.results import ResultsStore

    runs = ResultsStore(Path(__file__).resolve().parents[1] / "results").runs(finished=False)
    assert runs, "no stored runs to check"
    for run in runs:
        assert run.config.hash() == run.hash, run.path


def test_the_coreset_section_is_off_by_default_and_absent_from_the_hash():
    assert CoresetConfig().prune == 0.0
    assert "coreset" not in RunConfig().non_default()
    assert "coreset" in load_config(overrides=["coreset.prune=0.5"]).non_default()


def test_hash_is_stable_across_equal_configs_built_differently():
    a = load_config(overrides=["train.epochs=3", "quant.norm=shared"])
    b = from_dict({"quant": {"norm": "shared"}, "train": {"epochs": 3}})
    c = RunConfig(quant=QuantConfig(norm="shared"), train=TrainConfig(epochs=3))
    assert a.hash() == b.hash() == c.hash()


@pytest.mark.parametrize("key", [k for k in flat_keys() if k != "data.root"])
def test_hash_changes_with_any_field(key):
    base = RunConfig()
    changed = base.with_overrides({**COMPANIONS.get(key, {}), key: another_value(key, get(base, key))})
    assert get(changed, key) != get(base, key)
    assert changed.hash() != base.hash()


def test_where_the_data_lives_does_not_change_the_hash():
    here = load_config(overrides={"data.root": "data"})
    elsewhere = load_config(overrides={"data.root": "/somewhere/else/data"})
    assert elsewhere.hash() == here.hash() == RunConfig().hash()
    assert elsewhere.portable() == here


def test_float_and_int_spellings_of_a_float_hash_alike():
    assert load_config(overrides=["model.width=1"]).hash() == RunConfig().hash()


# ---- strictness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: RunConfig().with_overrides({"train.epoch": 3}),
    lambda: load_config(overrides=["train.epoch=3"]),
    lambda: from_dict({"train": {"epoch": 3}}),
], ids=["with_overrides", "load_config", "from_dict"])
def test_unknown_key_is_rejected_with_a_did_you_mean_suggestion(build):
    with pytest.raises(ConfigError) as e:
        build()
    msg = str(e.value)
    assert "unknown config key 'train.epoch'" in msg and "did you mean 'train.epochs'?" in msg
    assert "\n" not in msg


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'trian.epochs'.*did you mean 'train.epochs'"):
        RunConfig().with_overrides({"trian.epochs": 3})
    with pytest.raises(ConfigError, match="unknown config key 'optim'"):
        from_dict({"optim": {"lr": 1}})


@pytest.mark.parametrize("key, value", [
    ("train.epochs", "three"), ("train.epochs", 2.5), ("train.epochs", True), ("model.width", "wide"),
    ("model.preact", "yes"), ("model.preact", 1), ("quant.norm", 3), ("train.bits", "2,four"),
    ("train.bits", {"a": 1}), ("data.train_size", None),
])
def test_wrong_type_is_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        RunConfig().with_overrides({key: value})
    assert f"config key '{key}'" in str(e.value) and "\n" not in str(e.value)


def test_a_section_that_is_not_a_mapping_is_rejected():
    with pytest.raises(ConfigError, match="config section 'train' must be a mapping"):
        from_dict({"train": 5})


@pytest.mark.parametrize("value, expected", [
    ("2,4,8", (2, 4, 8)), ("2, 4 ,8,", (2, 4, 8)), ("32", (32,)), (8, (8,)), ([2, 32], (2, 32)),
])
def test_bits_given_as_a_string_or_number_are_parsed_to_a_tuple(value, expected):
    assert RunConfig().with_overrides({"train.bits": value}).train.bits == expected


def test_bits_given_on_the_command_line_are_parsed_to_a_tuple():
    cfg = load_config(overrides=["train.bits=2,4,8", "train.epochs=3", "model.width=0.5", "quant.detach_stats=false"])
    assert cfg.train.bits == (2, 4, 8)
    assert cfg.train.epochs == 3 and cfg.model.width == 0.5 and cfg.quant.detach_stats is False


@pytest.mark.parametrize("bits, what", [("2,33", "unsupported bit-width 33"), ("0", "unsupported bit-width 0"),
                                        ("2,2", "repeats a bit-width"), ("[]", "is empty")])
def test_bad_bit_widths_are_rejected(bits, what):
    with pytest.raises(ConfigError, match="train.bits") as e:
        load_config(overrides=[f"train.bits={bits}"])
    assert what in str(e.value)


@pytest.mark.parametrize("key, value", [("quant.norm", "foo"), ("quant.correction", "median"),
                                        ("quant.fp_act", "gelu"), ("train.distill", "self")])
def test_invalid_choice_is_rejected_naming_the_key_and_the_choices(key, value):
    with pytest.raises(ConfigError) as e:
        RunConfig().with_overrides({key: value})
    assert f"config key '{key}' is '{value}': use one of" in str(e.value)


def test_the_choices_of_each_key_are_the_registry_of_the_code_that_implements_them(monkeypatch):
    """validate reads every key's allowed values from where they are implemented (no second list in
    config.py): a new optimizer is one entry in the training loop's table, and a valid config value."""
    from emq.config import registered
    from emq.nn import layers, models
    from emq.training import distill, loop, recipes, speed

    implemented = {"quant.norm": layers.NORMS, "quant.fp_act": layers.FP_ACTS, "model.block": models.BLOCKS,
                   "train.distill": distill.DISTILL, "train.progressive": recipes.PROGRESSIVE,
                   "train.optimizer": loop.OPTIMIZERS, "train.schedule": loop.SCHEDULES, "train.amp": speed.AMP,
                   "train.channels_last": speed.SWITCH, "train.compile": speed.SWITCH}
    for key, registry in implemented.items():
        assert registered(key) is registry, key
    with pytest.raises(ConfigError, match="'train.optimizer' is 'rmsprop': use one of sgd, adam$"):
        load_config(overrides={"train.optimizer": "rmsprop"})
    monkeypatch.setitem(loop.OPTIMIZERS, "rmsprop", lambda model, t: None)
    assert load_config(overrides={"train.optimizer": "rmsprop"}).train.optimizer == "rmsprop"


@pytest.mark.parametrize("key, value", [("train.epochs", 0), ("train.batch_size", -1), ("model.depth", 0),
                                        ("model.width", 0.0), ("data.train_size", -5)])
def test_non_positive_sizes_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunConfig().with_overrides({key: value})


# YAML 1.1 (PyYAML's default) reads on/off/yes/no as booleans: the documented values of the speed
# options must arrive as the words written, from --set and from a config file alike (issue 9, item 3)
SPEED_WORDS = [("train.amp", "off"), ("train.channels_last", "on"), ("train.channels_last", "off"),
               ("train.compile", "off"), ("train.compile", "on")]


@pytest.mark.parametrize("key, word", SPEED_WORDS)
def test_on_and_off_given_with_set_arrive_as_the_words_written(key, word):
    assert get(load_config(overrides=[f"{key}={word}"]), key) == word


@pytest.mark.parametrize("key, word", SPEED_WORDS)
def test_on_and_off_in_a_config_file_arrive_as_the_words_written(key, word, tmp_path):
    section, name = key.split(".")
    path = tmp_path / "speed.yaml"
    path.write_text(f"{section}:\n  {name}: {word}\n")
    assert get(load_config(path), key) == word


@pytest.mark.parametrize("word, expected", [("false", False), ("False", False), ("true", True), ("TRUE", True)])
def test_true_and_false_still_give_booleans_from_set_and_from_a_file(word, expected, tmp_path):
    assert load_config(overrides=[f"quant.detach_stats={word}"]).quant.detach_stats is expected
    path = tmp_path / "c.yaml"
    path.write_text(f"quant:\n  detach_stats: {word}\n")
    assert load_config(path).quant.detach_stats is expected


def test_yes_and_no_for_a_bool_key_are_refused_asking_for_true_or_false():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model.preact=yes"])
    assert str(e.value) == "config key 'model.preact' needs a bool (write true or false), got 'yes'"


def test_a_wrong_type_message_uses_the_right_article():
    with pytest.raises(ConfigError, match="config key 'train.epochs' needs an int, got 'three'"):
        load_config(overrides=["train.epochs=three"])
    with pytest.raises(ConfigError, match="config key 'model.width' needs a float, got 'wide'"):
        load_config(overrides=["model.width=wide"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(overrides=["train.epochs"])


# ---- files and profiles ------------------------------------------------------------------------
def test_yaml_file_then_profile_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("quant:\n  norm: shared\ntrain:\n  epochs: 7\n  bits: [2, 8, 32]\n")
    cfg = load_config(path, overrides=["train.batch_size=32"], profile="smoke")
    assert cfg.quant.norm == "shared" and cfg.train.bits == (2, 8, 32)
    assert cfg.train.epochs == PROFILES["smoke"]["train.epochs"]  # the profile wins over the file
    assert cfg.train.batch_size == 32  # overrides win over the profile
    assert cfg.model.depth == PROFILES["smoke"]["model.depth"]


def test_missing_or_invalid_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(bad)
    assert "\n" not in str(e.value)


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("quant:\n  norm: shared  # été\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"config file '{path}' is not UTF-8 text (invalid continuation byte at byte 25)"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_applies_its_overrides(profile):
    cfg = load_config(profile=profile)
    for key, value in PROFILES[profile].items():
        assert get(cfg, key) == value


def test_unknown_profile_is_rejected_naming_the_profiles():
    with pytest.raises(ConfigError, match="unknown profile 'tiny': use one of smoke, cpu, gpu"):
        load_config(profile="tiny")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().train.epochs = 3


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_agree_with_the_method_registry(path):
    from emq.methods import method_config

    cfg = load_config(path)
    name = {"any_precision.yaml": "switchable", "emq_shared_bn.yaml": "shared_meanvar"}[path.name]
    assert cfg == method_config(name, RunConfig())


def test_a_run_folder_stores_no_data_location_and_is_found_from_any_data_root(tmp_path):
    from emq.results import ResultsStore, read_json

    store = ResultsStore(tmp_path)
    here = load_config(overrides={"train.epochs": 3, "data.root": str(tmp_path / "a" / "data")})
    run = store.run(here)
    assert read_json(run.path / "config.json")["data"]["root"] == "data"
    elsewhere = here.with_overrides({"data.root": "/another/clone/data"})
    assert store.run(elsewhere).path == run.path


def test_rehash_store_renames_runs_hashed_with_their_data_path_and_their_fine_tuned_children(tmp_path):
    """A store written when the data root was hashed: each run moves to its path-free hash, and a
    run fine-tuned from another (train.init_from) follows its source's new name."""
    from emq.results import rehash_store, write_json

    parent = load_config(overrides={"train.epochs": 2, "data.root": "/old/clone/data"})
    old_parent = hashlib.sha256(json.dumps(parent.non_default(), sort_keys=True, separators=(",", ":"))
                                .encode()).hexdigest()[:12]
    child = parent.with_overrides({"train.init_from": old_parent, "train.lr": 0.01})
    old_child = hashlib.sha256(json.dumps(child.non_default(), sort_keys=True, separators=(",", ":"))
                               .encode()).hexdigest()[:12]
    for old, cfg in ((old_parent, parent), (old_child, child)):
        write_json(tmp_path / "runs" / old / "config.json", cfg.to_dict())
        (tmp_path / "runs" / old / "summary.json").write_text("{}")

    renamed = rehash_store(tmp_path)

    new_parent = parent.portable().hash()
    new_child = child.portable().with_overrides({"train.init_from": new_parent}).hash()
    assert renamed == {old_parent: new_parent, old_child: new_child}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([new_parent, new_child])
    assert (tmp_path / "runs" / new_child / "summary.json").read_text() == "{}"
    moved = from_dict(json.loads((tmp_path / "runs" / new_child / "config.json").read_text()))
    assert moved.train.init_from == new_parent and moved.data.root == "data"
    assert rehash_store(tmp_path) == {}  # a store already path-free is left alone


def test_no_committed_run_config_names_a_machine_path():
    for path in sorted((Path(__file__).resolve().parents[1] / "results" / "runs").glob("*/config.json")):
        assert json.loads(path.read_text())["data"]["root"] == "data", path


@pytest.mark.parametrize(("text", "value"), [("1e-3", 0.001), ("5E4", 50000.0), ("-2.5e-1", -0.25), ("3", 3)])
def test_exponent_floats_are_floats_as_in_yaml_1_2_and_integers_stay_integers(text, value):
    cfg = load_config(overrides=[f"train.lr={text}", f"train.epochs={3 if isinstance(value, float) else text}"])
    assert cfg.train.lr == float(value) and isinstance(cfg.train.epochs, int)
