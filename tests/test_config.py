"""Config: strict loading from dicts and YAML, dotted overrides, typo suggestions, type and
combination checks, `replace`, and a dump -> load round trip."""

from __future__ import annotations

import pytest
import yaml

from forgetting_lib import config
from forgetting_lib.config import Config, ConfigError

BASE = {
    "data": {"path": "x.bin", "T": 32, "batch_size": 4},
    "model": {"D": 64, "L": 2, "H": 16, "V": 128},
    "opt": {"lr": 3e-3},
    "stop": {"num_tokens_train": 10_000},
}


def test_load_from_dict_sets_fields_and_keeps_defaults():
    cfg = config.load(BASE)
    assert isinstance(cfg, Config)
    assert (cfg.model.D, cfg.model.L, cfg.model.H, cfg.model.V) == (64, 2, 16, 128)
    assert cfg.data.T == 32 and cfg.stop.num_tokens_train == 10_000 and cfg.opt.lr == 3e-3
    assert cfg.opt.b1 == config.OptConfig().b1  # untouched fields keep their defaults
    with pytest.raises(AttributeError):  # frozen
        cfg.model.D = 128  # type: ignore[misc]


def test_load_from_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = config.load(path, ["opt.lr=1e-3", "model.D=128", ("data.T", 16), "run.name=abc"])
    # PyYAML reads `1e-3` (no dot) as the *string* "1e-3": it must still become a float.
    assert yaml.safe_load("1e-3") == "1e-3"
    assert cfg.opt.lr == 1e-3 and type(cfg.opt.lr) is float
    assert cfg.model.D == 128 and type(cfg.model.D) is int
    assert cfg.data.T == 16 and cfg.run.name == "abc"
    assert cfg.model.L == 2  # from the file


def test_yaml_file_with_string_float_is_a_float(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("opt:\n  lr: 1e-3\n  warmup_tokens: 1e4\nstop:\n  num_tokens_train: 1e6\n")
    cfg = config.load(path)
    assert cfg.opt.lr == 1e-3 and type(cfg.opt.lr) is float
    assert cfg.opt.warmup_tokens == 10_000 and type(cfg.opt.warmup_tokens) is int
    assert cfg.stop.num_tokens_train == 1_000_000 and type(cfg.stop.num_tokens_train) is int


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["opt.lrr=1e-3"], r"opt\.lrr.*did you mean opt\.lr\?"),
        (["optt.lr=1e-3"], r"optt.*did you mean opt\?"),
        (["model.dtpye=float32"], r"did you mean model\.dtype\?"),
        (["stop.num_token_train=5"], r"did you mean stop\.num_tokens_train\?"),
    ],
)
def test_unknown_key_names_the_nearest_one(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(BASE, overrides)


def test_unknown_key_in_dict_and_without_a_near_match():
    with pytest.raises(ConfigError, match=r"data\.batchsize.*did you mean data\.batch_size"):
        config.load({**BASE, "data": {**BASE["data"], "batchsize": 4}})
    with pytest.raises(ConfigError, match=r"zzzzzz.*valid keys:.*lr"):
        config.load(BASE, ["opt.zzzzzz=1"])


def test_override_must_name_section_and_key():
    with pytest.raises(ConfigError, match="section.key"):
        config.load(BASE, ["lr=1e-3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(BASE, ["opt.lr"])


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.D", 1.5),
        ("model.D", "64x"),
        ("model.D", True),
        ("model.remat", "yes"),
        ("model.remat", 1),
        ("opt.lr", "fast"),
        ("opt.lr", True),
        ("run.name", 3),
        ("data.T", None),
        ("stop.num_tokens_train", 10.5),
    ],
)
def test_wrong_types_are_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(BASE, [(key, value)])


def test_accepted_coercions():
    cfg = config.load(
        BASE, [("model.D", 64.0), ("opt.lr", 1), ("model.remat", True), ("stop.target_loss", None)]
    )
    assert type(cfg.model.D) is int and type(cfg.opt.lr) is float and cfg.model.remat is True
    assert cfg.stop.target_loss is None


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"stop.num_tokens_train": 1000, "stop.num_epochs": 2}, "stop"),  # two length rules
        ({"stop.num_tokens_train": 1000, "stop.tokens_per_param": 2.0}, "stop"),
        (
            {"stop.num_tokens_train": None, "opt.schedule": "cosine", "stop.target_loss": 1.0},
            "opt.schedule",
        ),  # cosine, no length
        ({"stop.num_tokens_train": None}, "stop"),  # no stop rule at all
        ({"mix.fraction": 0.25}, "mix.path"),  # fraction, no file
        ({"mix.fraction": 1.0, "mix.path": "m.bin"}, "mix.fraction"),
        ({"model.D": 60, "model.H": 16}, "model.D"),  # D % H != 0
        ({"model.V": 0}, "model.V"),
        ({"model.kv_heads": 3}, "model.kv_heads"),  # must divide the 4 heads
        ({"model.mlp": "relu"}, "model.mlp"),
        ({"model.param_dtype": "float16"}, "model.param_dtype"),
        ({"reg.prompt": "text"}, "reg.prompt"),
        ({"reg.prompt": "chat"}, "reg.prompt"),  # without reg.synth: nothing is sampled
        ({"data.old_path": "old.bin"}, "data.old_path"),  # no parent
        ({"model.rope_theta": 0.0}, "model.rope_theta"),
        ({"model.rope_factor": 8.0, "model.rope_low_freq": 4.0}, "model.rope_high_freq"),
        ({"model.dtype": "float16"}, "model.dtype"),
        ({"opt.schedule": "linear"}, "opt.schedule"),
        ({"opt.lr": 0.0}, "opt.lr"),
        ({"data.microbatch_rows": 3}, "data.microbatch_rows"),  # must divide B=4
        ({"stop.patience": 0, "stop.num_tokens_train": None}, "stop"),
        ({"stop.train_time_s": -1.0}, "stop.train_time_s"),
        ({"log.every_tokens": 0}, "log.every_tokens"),
    ],
)
def test_invalid_combinations_are_rejected(overrides, key):
    with pytest.raises(ConfigError) as err:
        config.load(BASE, list(overrides.items()))
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_valid_edge_combinations_are_accepted():
    cfg = config.load(
        BASE,
        [
            ("model.V", 65536),
            ("opt.schedule", "cosine"),
            ("stop.target_loss", 1.0),
            ("stop.patience", 3),
            ("mix.path", "m.bin"),
            ("mix.fraction", 0.5),
        ],
    )
    assert cfg.model.V == 65536 and cfg.mix.fraction == 0.5
    only_time = config.load(BASE, [("stop.num_tokens_train", None), ("stop.train_time_s", 5)])
    assert only_time.stop.train_time_s == 5.0


def test_replace_returns_a_validated_copy():
    cfg = config.load(BASE)
    new = cfg.replace({"model.D": 128, "opt.lr": "1e-2"})
    assert (new.model.D, new.opt.lr) == (128, 1e-2)
    assert (cfg.model.D, cfg.opt.lr) == (64, 3e-3)  # the original is unchanged
    assert new.replace({"model.D": 64, "opt.lr": 3e-3}) == cfg
    with pytest.raises(ConfigError, match=r"did you mean model\.D"):
        cfg.replace({"model.DD": 128})
    with pytest.raises(ConfigError, match="model.D"):
        cfg.replace({"model.D": 100})  # not a multiple of H=16


def test_dump_load_round_trip(tmp_path):
    cfg = config.load(
        BASE,
        [
            "opt.lr=1e-3",
            "stop.target_loss=2.5",
            "mix.path=m.bin",
            "mix.fraction=0.25",
            "model.remat=true",
            "log.checkpoint_every_tokens=4096",
        ],
    )
    config.dump(cfg, tmp_path / "c.yaml")
    again = config.load(tmp_path / "c.yaml")
    assert again == cfg and again.to_dict() == cfg.to_dict()
    config.dump(config.load(BASE), tmp_path / "d.yaml")  # defaults (None, '') survive too
    assert config.load(tmp_path / "d.yaml") == config.load(BASE)
