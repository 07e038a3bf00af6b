"""1-D regression illustration: data, the Gaussian KL, a small SGHMC ensemble that fits the old
points and forgets them without the KL (but not with it), resumable results, the parameter
files, and the figure notebook executed end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from forgetting_lib import config as config_lib
from forgetting_lib.figures.regression1d import plots as regression1d_plots, study as r1d

ROOT = Path(__file__).resolve().parents[1]
# 16 particles and short runs: ~2 s after compilation, same qualitative result as the quick scale
SMALL = {
    "chains": 2,
    "particles_per_chain": 8,
    "burn_in_steps": 2000,
    "thin_steps": 10,
    "adapt_steps": 300,
    "adapt_lr": 3e-3,
    "n_test": 100,
    "grid_points": 50,
}
TINY = {
    "chains": 2,
    "particles_per_chain": 2,
    "burn_in_steps": 20,
    "thin_steps": 2,
    "adapt_steps": 5,
    "n_old": 8,
    "n_new": 8,
    "n_test": 8,
    "grid_points": 16,
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("r1d")
    return out, r1d.run(SMALL, out)


def test_data_lies_in_its_intervals_and_is_seeded():
    cfg = r1d.load_config({})
    data = r1d.make_data(cfg, key=jax.random.key(0))
    for name, lo, hi, n in [
        ("old", cfg.old_lo, cfg.old_hi, cfg.n_old),
        ("new", cfg.new_lo, cfg.new_hi, cfg.n_new),
        ("test_old", cfg.old_lo, cfg.old_hi, cfg.n_test),
        ("test_new", cfg.new_lo, cfg.new_hi, cfg.n_test),
    ]:
        x, y = data[f"x_{name}"], data[f"y_{name}"]
        assert x.shape == y.shape == (n,) and x.dtype == y.dtype == jnp.float32
        assert lo <= float(x.min()) and float(x.max()) <= hi
        residual = np.asarray(y - r1d.target(x))
        assert 0.5 * cfg.noise_std < residual.std() < 1.5 * cfg.noise_std
    again = r1d.make_data(cfg, key=jax.random.key(0))
    other = r1d.make_data(cfg, key=jax.random.key(1))
    assert all(jnp.array_equal(data[k], again[k]) for k in data)
    assert not jnp.array_equal(data["x_old"], other["x_old"])


def test_gaussian_kl():
    mu, var = jnp.array([0.0, 1.5]), jnp.array([1.0, 0.3])
    np.testing.assert_allclose(r1d.gaussian_kl(mu, var, mu, var), 0.0, atol=1e-7)
    np.testing.assert_allclose(
        r1d.gaussian_kl(jnp.array(0.0), jnp.array(1.0), jnp.array(1.0), jnp.array(2.0)),
        0.5 * math.log(2.0),
        rtol=1e-6,
    )


def test_forward_shapes():
    thetas = r1d.init_params(3, key=jax.random.key(0))
    assert thetas.shape == (3, r1d.N_PARAMS) == (3, 3649)
    out = r1d.ensemble_forward(thetas, jnp.linspace(-1, 1, 5))
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out[1], r1d.forward(thetas[1], jnp.linspace(-1, 1, 5)), rtol=1e-6)


def test_no_implicit_dtype_casts():
    """Our code under strict promotion (optax's Adam internals are not strict-clean, so the
    adaptation is checked through its loss gradient)."""
    cfg = r1d.load_config(TINY)
    with jax.numpy_dtype_promotion("strict"):
        data = r1d.make_data(cfg, key=jax.random.key(0))
        thetas = r1d.fit_ensemble(cfg, data, key=jax.random.key(1))  # [K, P]
        mu_0, var_0 = r1d.predictive(thetas, data["x_old"], cfg.noise_std)
        grad = jax.grad(r1d.adapt_loss)(
            thetas, data["x_new"], data["y_new"], data["x_old"], mu_0, var_0, cfg.kl_coeff, cfg.noise_std
        )
    assert thetas.shape == grad.shape == (cfg.particles, r1d.N_PARAMS)
    assert thetas.dtype == grad.dtype == jnp.float32 and bool(jnp.isfinite(grad).all())


def test_ensemble_fits_old_points_and_kl_prevents_forgetting(small_run):
    _, results = small_run
    old, new = results["rmse"]["old"], results["rmse"]["new"]
    assert old["before"] < 0.08  # noise std 0.05: a near-perfect fit
    assert new["before"] > 0.3  # the new region is not learned yet
    assert old["new_only"] > 3 * old["before"]  # new points alone: forgetting
    assert old["with_kl"] < 1.3 * old["before"]  # KL on old inputs: kept
    assert new["new_only"] < 0.1 and new["with_kl"] < 0.1  # both fit the new region
    assert abs(new["new_only"] - new["with_kl"]) < 0.02


def test_results_file_and_figure(small_run):
    out, results = small_run
    assert json.loads((out / r1d.RESULTS).read_text()) == results
    grid = results["grid"]
    assert len(grid["x"]) == SMALL["grid_points"]
    for name in ("before", "new_only", "with_kl"):
        assert len(grid[name]["mean"]) == len(grid[name]["std"]) == SMALL["grid_points"]
        assert min(grid[name]["std"]) >= r1d.load_config({}).noise_std * 0.999
    table = r1d.rmse_table(results)
    assert table.loc[("old", "new_only"), "paper"] == 0.520
    assert np.isnan(table.loc[("new", "before"), "paper"])
    fig = regression1d_plots.predictions(results)
    assert len(fig.data) == 3 * 5


def test_results_are_reused_only_for_the_same_config(small_run, monkeypatch):
    out, results = small_run

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(r1d, "_fit_and_adapt", refuse)
    assert r1d.run(SMALL, out) == results
    with pytest.raises(AssertionError, match="recomputed"):
        r1d.run({**SMALL, "kl_coeff": 2.0}, out)


def test_load_config_is_strict():
    with pytest.raises(config_lib.ConfigError, match="did you mean kl_coeff"):
        r1d.load_config({"kl_coef": 1.0})
    with pytest.raises(config_lib.ConfigError, match="disjoint"):
        r1d.load_config({"new_lo": -1.0})
    with pytest.raises(config_lib.ConfigError, match="friction"):
        r1d.load_config({"friction": 1.5})


@pytest.mark.parametrize("scale", ["quick", "paper"])
def test_shipped_parameter_files_load(scale):
    raw = yaml.safe_load((ROOT / "params" / scale / "1d_regression.yaml").read_text())
    assert raw["notebook"] == "figures/1d_regression"
    cfg = r1d.load_config(raw["config"])
    assert (cfg.chains, cfg.particles_per_chain) == (4, 80)  # the paper's ensemble at both scales


def test_notebook_runs_with_tiny_parameters(tmp_path):
    from forgetting_lib.experiments import notebooks

    out = notebooks.run_notebook(
        ROOT / "notebooks" / "figures" / "1d_regression.ipynb",
        {"config": TINY, "out_dir": str(tmp_path / "run"), "figures_dir": str(tmp_path / "figures")},
        tmp_path,
        cwd=ROOT,
    )
    assert out.is_file()
    assert json.loads((tmp_path / "run" / r1d.RESULTS).read_text())["config"]["chains"] == 2
    assert (tmp_path / "figures" / "1d_regression.html").is_file()
