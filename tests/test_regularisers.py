"""The regulariser registry and the method table: consistent entries, the penalties on hand-made
trees, every name resolvable from a config, and L2-SP (the registry's newest entry) end to end."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib import config as config_lib, methods, runs
from forgetting_lib.engine import regularisers
from forgetting_lib.engine.regularisers import REGULARISERS

from finetune_fixtures import world  # noqa: F401 - the shared parent (a fixture)


@pytest.mark.parametrize("name", list(REGULARISERS))
def test_registry_entry_is_consistent(name):
    r = REGULARISERS[name]
    assert r.name == name and r.literature and r.summary
    assert (r.term is None) == (name in ("none", "replace"))  # the two methods without a loss term
    assert not r.coeff_is_fraction or (r.replay_rows and r.term is None)  # a fraction of rows, no weight
    assert not r.fisher or r.frozen  # the Fisher's anchor is the parent
    assert r.needs_replay_source == (r.replay_rows or r.fisher)
    assert r.needs_parent == r.uses_coeff == (name != "none")


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(KeyError, match="l2sp"):
        regularisers.get("l2_sp")
    with pytest.raises(config_lib.ConfigError, match="reg.method='l2_sp' must be one of .*l2sp"):
        config_lib.from_dict(
            {"model": {"load_path": "p"}, "stop": {"num_tokens_train": 1}}, [("reg.method", "l2_sp")]
        )


def test_penalties_on_hand_made_trees():
    params = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array([[3.0]])}}
    anchor = {"a": jnp.array([0.0, 0.0]), "b": {"c": jnp.array([[1.0]])}}
    fisher = {"a": jnp.array([2.0, 0.5]), "b": {"c": jnp.array([[0.0]])}}
    assert float(regularisers.l2sp_penalty(params, anchor)) == 1 + 4 + 4
    assert float(regularisers.ewc_penalty(params, anchor, fisher)) == 2 * 1 + 0.5 * 4 + 0
    assert float(regularisers.l2sp_penalty(anchor, anchor)) == 0.0


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_name_resolves_to_a_valid_config(name):
    method = methods.get(name)
    cfg = config_lib.from_dict(
        {"model": {"load_path": "parent"}, "stop": {"num_tokens_train": 1}}, [("method", name)]
    )
    assert cfg.reg.method == method.reg_method in REGULARISERS
    assert cfg.reg.synth is (method.source == methods.SELF)
    assert (cfg.lora.rank > 0) == (method.family == "LoRA")
    assert (method.source is not None) == REGULARISERS[method.reg_method].needs_replay_source


def test_method_key_expands_in_place_and_later_keys_refine_it():
    base = {"model": {"load_path": "p"}, "stop": {"num_tokens_train": 1}, "method": "kl_self"}
    cfg = config_lib.from_dict(base, [("reg.synth", False), ("reg.coeff", 3.0)])
    assert (cfg.reg.method, cfg.reg.synth, cfg.reg.coeff) == ("kl_pre", False, 3.0)
    cfg = config_lib.from_dict(base, ["reg.synth=false", "method=ewc"])  # an override applies in order
    assert (cfg.reg.method, cfg.reg.synth) == ("ewc", False)
    with pytest.raises(config_lib.ConfigError, match="method: .*'kl_sefl'.*valid: standard"):
        config_lib.from_dict(base, [("method", "kl_sefl")])


def test_named_methods_accept_names_refinements_and_custom_entries():
    assert methods.named(["standard", {"ewc": {"reg.coeff": 10.0}}]) == {
        "standard": {"method": "standard"},
        "ewc": {"method": "ewc", "reg.coeff": 10.0},
    }
    assert methods.named({"mine": {"reg.method": "kl_dwn"}}) == {"mine": {"reg.method": "kl_dwn"}}
    with pytest.raises(KeyError, match="no overrides of its own"):
        methods.named(["mine"])


def test_explorer_families_cover_the_table():
    assert methods.families() == ["none", "LoRA", "NTP", "KL", "replace", "EWC", "L2-SP"]
    assert methods.sources("KL") == [methods.REAL, methods.SELF] and methods.sources("L2-SP") == []
    assert methods.find("KL", methods.SELF).name == "kl_self"
    assert methods.find("L2-SP", methods.SELF).name == "l2sp"  # no source: the one entry


def test_l2sp_keeps_the_weights_near_the_parent(world):  # noqa: F811
    plain = world.finetune("none")  # the same run as test_finetune's `plain`
    l2sp = world.finetune("l2sp_strong", {"method": "l2sp", "reg.coeff": 1.0})
    plain_rows, rows = runs.read_metrics(plain.out_dir), runs.read_metrics(l2sp.out_dir)
    assert rows[0]["drift"] == 0.0 and rows[-1]["drift"] < 0.5 * plain_rows[-1]["drift"]
    assert rows[-1]["forgetting"] < 0.5 * plain_rows[-1]["forgetting"]
    assert rows[-1]["train_reg"] > 0 and np.isfinite(rows[-1]["valid_ntp"])


def test_readme_tables_list_every_regulariser_and_method():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for r in REGULARISERS.values():
        assert f"| `{r.name}` | {r.summary} | {r.literature} |" in readme, r.name
    for m in methods.METHODS.values():
        assert f"| `{m.name}` |" in readme and m.label in readme, m.name
