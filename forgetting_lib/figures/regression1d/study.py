"""1-D regression illustration: a KL on old inputs keeps an ensemble's old predictions.

The paper's setup: an MLP 1-48-48-24-1 with tanh, an SGHMC ensemble of 4 chains x 80 particles
fitted to "old" points, then adapted to "new" points alone or with a Gaussian moment-matched KL
on the old inputs. The paper does not give the data, the sampler settings or the adaptation
procedure; **these choices are ours**:

- Data: y = sin(3x) + 0.3 x + noise, noise ~ N(0, 0.05^2) (`noise_std`). Old inputs uniform
  in [-2, -0.5], new inputs uniform in [0.5, 2] (`old_lo` .. `new_hi`), `n_old` / `n_new`
  training points, and `n_test` held-out noisy points per region for the RMSEs. The data has
  its own seed (`data_seed`), so every run sees the same points.
- SGHMC (Chen et al. 2014, full-batch gradients): potential U(theta) = sum of squared errors
  / (2 noise_std^2) + |theta|^2 / (2 prior_std^2); per step
  v <- (1 - friction) v - step_size grad U + N(0, 2 friction step_size), theta <- theta + v.
  Each of `chains` chains runs `burn_in_steps`, then keeps one sample every `thin_steps`
  steps until it holds `particles_per_chain`; the ensemble is all chains' samples, K of them.
- Adaptation: Adam (`adapt_lr`, `adapt_steps`) on all K particles jointly, loss
  mean_k mean_i (y_i - f_k(x_i))^2 / (2 noise_std^2) over the new points, plus `kl_coeff` x
  mean over the old training inputs x of KL(N(mu_0(x), var_0(x)) || N(mu(x), var(x))), where
  mu, var are the ensemble mean and variance of f_k(x) (+ noise_std^2), 0 = before adapting
  (forward KL, the frozen ensemble as teacher). kl_coeff = 0 is "new only".
- RMSE of a region = RMSE of the ensemble mean against that region's held-out noisy points.

Shapes: K particles (networks), C chains, P = N_PARAMS parameters of one network (flattened),
B inputs. One network is a flat vector theta [P]; an ensemble is [K, P].
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
import pandas as pd

from ... import config as config_lib
from ...engine.step import THIRD_PARTY_PROMOTION
from ...fileio import atomic_write_json

# The paper's RMSEs (MLP 1-48-48-24-1 tanh, SGHMC ensemble of 4 chains x 80 particles).
PAPER = {
    "old_rmse": {"before": 0.059, "new_only": 0.520, "with_kl": 0.097},
    "new_rmse": {"new_only": 0.176, "with_kl": 0.178},
}

WIDTHS = (1, 48, 48, 24, 1)  # the paper's MLP
LAYERS = tuple(itertools.pairwise(WIDTHS))  # (fan_in, fan_out) of each dense layer
N_PARAMS = sum(i * o + o for i, o in LAYERS)  # P = 3,649
KEY_INIT, KEY_SGHMC = 0, 1  # named streams of the run's root key
RESULTS = "results.json"
SETS = ("old", "new", "test_old", "test_new")  # the data sets of make_data


@dataclass(frozen=True)
class Regression1DConfig:
    seed: int = 0  # root of the init and SGHMC noise keys
    data_seed: int = 0  # seed of the data points (independent of seed)
    n_old: int = 40  # old training points
    n_new: int = 40  # new training points
    n_test: int = 200  # held-out noisy points per region (RMSEs)
    old_lo: float = -2.0  # old inputs are uniform in [old_lo, old_hi]
    old_hi: float = -0.5
    new_lo: float = 0.5  # new inputs are uniform in [new_lo, new_hi]
    new_hi: float = 2.0
    noise_std: float = 0.05  # observation noise std (data and likelihood)
    prior_std: float = 1.0  # Gaussian prior std of every weight and bias
    chains: int = 4  # independent SGHMC chains
    particles_per_chain: int = 80  # samples kept per chain (ensemble size K = chains x this)
    burn_in_steps: int = 5000  # SGHMC steps before the first kept sample
    thin_steps: int = 25  # SGHMC steps between kept samples
    step_size: float = 2e-6  # SGHMC learning rate eta (units of theta^2 per unit U)
    friction: float = 0.05  # SGHMC momentum decay alpha per step, in (0, 1)
    adapt_steps: int = 500  # Adam steps of the adaptation to the new points
    adapt_lr: float = 2e-3  # Adam learning rate of the adaptation
    kl_coeff: float = 1.0  # weight of the old-input KL in the "with KL" adaptation
    grid_points: int = 200  # points of the plotting grid

    @property
    def particles(self) -> int:
        return self.chains * self.particles_per_chain


def load_config(raw: Mapping[str, Any] | Regression1DConfig | None = None) -> Regression1DConfig:
    """A validated config from a mapping (unknown keys are errors naming the nearest key)."""
    cfg = (
        raw
        if isinstance(raw, Regression1DConfig)
        else config_lib.build_dataclass(Regression1DConfig, dict(raw or {}))
    )
    counts = (
        cfg.n_old,
        cfg.n_new,
        cfg.n_test,
        cfg.chains,
        cfg.particles_per_chain,
        cfg.thin_steps,
        cfg.adapt_steps,
        cfg.grid_points,
    )
    if min(counts) < 1 or cfg.burn_in_steps < 0 or cfg.particles < 2:
        raise config_lib.ConfigError(
            "counts and steps must be >= 1 (burn_in_steps >= 0) and the ensemble must hold >= 2 particles"
        )
    if not (
        cfg.old_lo < cfg.old_hi
        and cfg.new_lo < cfg.new_hi
        and (cfg.old_hi < cfg.new_lo or cfg.new_hi < cfg.old_lo)
    ):
        raise config_lib.ConfigError("old_lo < old_hi, new_lo < new_hi and the intervals disjoint")
    if not (
        0 < cfg.friction < 1
        and cfg.step_size > 0
        and cfg.noise_std > 0
        and cfg.prior_std > 0
        and cfg.adapt_lr > 0
        and cfg.kl_coeff >= 0
    ):
        raise config_lib.ConfigError(
            "friction in (0, 1); step_size, noise_std, prior_std, adapt_lr > 0; kl_coeff >= 0"
        )
    return cfg


# ---- data -----------------------------------------------------------------------------------


def target(x: jax.Array) -> jax.Array:
    """The noise-free function (ours; the paper does not give its own)."""
    return jnp.sin(3.0 * x) + 0.3 * x


def make_data(cfg: Regression1DConfig, *, key: jax.Array) -> dict[str, jax.Array]:
    """x_<set>, y_<set> [n] f32 for each set of SETS: old / new training points, and held-out
    test_old / test_new points (n_test each) from the same intervals, all with noise."""
    specs = {
        "old": (cfg.old_lo, cfg.old_hi, cfg.n_old),
        "new": (cfg.new_lo, cfg.new_hi, cfg.n_new),
        "test_old": (cfg.old_lo, cfg.old_hi, cfg.n_test),
        "test_new": (cfg.new_lo, cfg.new_hi, cfg.n_test),
    }
    out = {}
    for i, name in enumerate(SETS):
        lo, hi, n = specs[name]
        kx, ky = jax.random.split(jax.random.fold_in(key, i))
        x = jax.random.uniform(kx, (n,), jnp.float32, lo, hi)  # [n]
        out[f"x_{name}"] = x
        out[f"y_{name}"] = target(x) + cfg.noise_std * jax.random.normal(ky, (n,), jnp.float32)
    return out


# ---- the MLP, one network = one flat parameter vector ---------------------------------------


def init_params(n: int, *, key: jax.Array) -> jax.Array:
    """n networks [n, P]: weights ~ N(0, 1/fan_in), biases 0."""
    parts, keys = [], jax.random.split(key, len(LAYERS))
    for k, (d_in, d_out) in zip(keys, LAYERS):
        w = jax.random.normal(k, (n, d_in * d_out), jnp.float32) * d_in**-0.5  # [n, in*out]
        parts += [w, jnp.zeros((n, d_out), jnp.float32)]
    return jnp.concatenate(parts, axis=1)  # [n, P]


def forward(theta: jax.Array, x: jax.Array) -> jax.Array:
    """One network theta [P] on inputs x [B] -> outputs [B]."""
    h, i = x[:, None], 0  # [B, 1]
    for layer, (d_in, d_out) in enumerate(LAYERS):
        w = theta[i : i + d_in * d_out].reshape(d_in, d_out)  # [in, out]
        b = theta[i + d_in * d_out : i + d_in * d_out + d_out]  # [out]
        i += d_in * d_out + d_out
        h = jnp.einsum("bi,io->bo", h, w) + b[None, :]
        if layer < len(LAYERS) - 1:
            h = jnp.tanh(h)
    return h[:, 0]


ensemble_forward = jax.vmap(forward, in_axes=(0, None))  # [K, P], [B] -> [K, B]


def predictive(thetas: jax.Array, x: jax.Array, noise_std: float) -> tuple[jax.Array, jax.Array]:
    """Moment-matched Gaussian predictive: mean [B] and variance [B] (ensemble var + noise^2)."""
    f = ensemble_forward(thetas, x)  # [K, B]
    return f.mean(axis=0), f.var(axis=0) + noise_std**2


def rmse(thetas: jax.Array, x: jax.Array, y: jax.Array) -> float:
    """RMSE of the ensemble mean on points x, y [B]."""
    return float(jnp.sqrt(jnp.mean((ensemble_forward(thetas, x).mean(axis=0) - y) ** 2)))


# ---- SGHMC ----------------------------------------------------------------------------------


def potential(theta: jax.Array, x: jax.Array, y: jax.Array, noise_std: float, prior_std: float) -> jax.Array:
    """U(theta) = -log likelihood - log prior (up to constants), scalar."""
    sse = jnp.sum((forward(theta, x) - y) ** 2)
    return sse / (2 * noise_std**2) + jnp.sum(theta**2) / (2 * prior_std**2)


@partial(jax.jit, static_argnames=("burn_in", "thin", "samples"))
def sghmc(
    theta: jax.Array,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    burn_in: int,
    thin: int,
    samples: int,
    step_size: float,
    friction: float,
    noise_std: float,
    prior_std: float,
) -> jax.Array:
    """Run C chains from theta [C, P]; return the kept samples [samples, C, P]."""
    grad = jax.vmap(jax.grad(potential), in_axes=(0, None, None, None, None))
    noise_scale = jnp.sqrt(2.0 * friction * step_size)

    def step(t, state):
        theta, v = state
        noise = noise_scale * jax.random.normal(jax.random.fold_in(key, t), theta.shape)  # [C, P]
        v = (1.0 - friction) * v - step_size * grad(theta, x, y, noise_std, prior_std) + noise
        return theta + v, v

    state = jax.lax.fori_loop(0, burn_in, step, (theta, jnp.zeros_like(theta)))

    def keep(state, s):
        start = burn_in + s * thin
        state = jax.lax.fori_loop(start, start + thin, step, state)
        return state, state[0]

    _, kept = jax.lax.scan(keep, state, jnp.arange(samples))
    return kept  # [samples, C, P]


def fit_ensemble(cfg: Regression1DConfig, data: dict[str, jax.Array], *, key: jax.Array) -> jax.Array:
    """The SGHMC ensemble on the old points, [K, P] (K = chains x particles_per_chain)."""
    k_init, k_sghmc = jax.random.fold_in(key, KEY_INIT), jax.random.fold_in(key, KEY_SGHMC)
    kept = sghmc(
        init_params(cfg.chains, key=k_init),
        data["x_old"],
        data["y_old"],
        key=k_sghmc,
        burn_in=cfg.burn_in_steps,
        thin=cfg.thin_steps,
        samples=cfg.particles_per_chain,
        step_size=cfg.step_size,
        friction=cfg.friction,
        noise_std=cfg.noise_std,
        prior_std=cfg.prior_std,
    )
    return jnp.swapaxes(kept, 0, 1).reshape(cfg.particles, N_PARAMS)  # [K, P], chain-major


# ---- adaptation -----------------------------------------------------------------------------


def gaussian_kl(mu_p: jax.Array, var_p: jax.Array, mu_q: jax.Array, var_q: jax.Array) -> jax.Array:
    """KL(N(mu_p, var_p) || N(mu_q, var_q)) elementwise."""
    return 0.5 * (jnp.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0)


def adapt_loss(
    thetas: jax.Array,
    x_new: jax.Array,
    y_new: jax.Array,
    x_old: jax.Array,
    mu_0: jax.Array,
    var_0: jax.Array,
    kl_coeff: jax.Array,
    noise_std: float,
) -> jax.Array:
    """New-point Gaussian NLL (mean over particles and points) + kl_coeff x mean old-x KL."""
    nll = jnp.mean((ensemble_forward(thetas, x_new) - y_new[None, :]) ** 2) / (2 * noise_std**2)
    mu, var = predictive(thetas, x_old, noise_std)  # [N_old] each
    return nll + kl_coeff * jnp.mean(gaussian_kl(mu_0, var_0, mu, var))


@partial(jax.jit, static_argnames=("steps",))
def adapt(
    thetas: jax.Array,
    x_new: jax.Array,
    y_new: jax.Array,
    x_old: jax.Array,
    *,
    steps: int,
    lr: float,
    kl_coeff: float,
    noise_std: float,
) -> jax.Array:
    """Adam on all particles [K, P] jointly; the KL teacher is the ensemble passed in."""
    mu_0, var_0 = predictive(thetas, x_old, noise_std)
    opt = optax.adam(lr)
    grad = jax.grad(adapt_loss)

    def step(state, _):
        params, opt_state = state
        g = grad(params, x_new, y_new, x_old, mu_0, var_0, kl_coeff, noise_std)
        with THIRD_PARTY_PROMOTION:
            updates, opt_state = opt.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (thetas, _), _ = jax.lax.scan(step, (thetas, opt.init(thetas)), None, length=steps)
    return thetas


# ---- the experiment -------------------------------------------------------------------------


def _fit_and_adapt(
    cfg: Regression1DConfig, data: dict[str, jax.Array]
) -> tuple[dict[str, jax.Array], dict[str, float]]:
    """The three ensembles [K, P] (before, new_only, with_kl) and the seconds each took."""
    start = time.perf_counter()
    before = fit_ensemble(cfg, data, key=jax.random.key(cfg.seed)).block_until_ready()
    ensembles = {"before": before}
    seconds = {"sghmc_s": time.perf_counter() - start}
    for name, coeff in (("new_only", 0.0), ("with_kl", cfg.kl_coeff)):
        start = time.perf_counter()
        ensembles[name] = adapt(
            ensembles["before"],
            data["x_new"],
            data["y_new"],
            data["x_old"],
            steps=cfg.adapt_steps,
            lr=cfg.adapt_lr,
            kl_coeff=coeff,
            noise_std=cfg.noise_std,
        ).block_until_ready()
        seconds[f"{name}_s"] = time.perf_counter() - start
    return ensembles, seconds


def _grid(cfg: Regression1DConfig, ensembles: dict[str, jax.Array]) -> dict[str, Any]:
    """Predictive mean and std (ensemble + noise) of every ensemble on a grid covering both
    intervals with a margin of 0.5, and the noise-free target there."""
    lo, hi = min(cfg.old_lo, cfg.new_lo) - 0.5, max(cfg.old_hi, cfg.new_hi) + 0.5
    x = jnp.linspace(lo, hi, cfg.grid_points, dtype=jnp.float32)  # [G]
    out: dict[str, Any] = {"x": x.tolist(), "target": target(x).tolist()}
    for name, thetas in ensembles.items():
        mean, var = predictive(thetas, x, cfg.noise_std)
        out[name] = {"mean": mean.tolist(), "std": jnp.sqrt(var).tolist()}
    return out


def run(config: Mapping[str, Any] | Regression1DConfig | None, out_dir: str | Path) -> dict[str, Any]:
    """Fit the SGHMC ensemble on the old points, adapt it with and without the KL, and write
    `out_dir/results.json`: the config, the data, RMSEs `rmse[region][ensemble]` (region old /
    new, ensemble before / new_only / with_kl), the grid predictions and timings. A results file
    written with the same config is returned as it is, without recomputing."""
    cfg = load_config(config)
    path = Path(out_dir) / RESULTS
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("config") == dataclasses.asdict(cfg):
            return previous
    start = time.perf_counter()
    data = make_data(cfg, key=jax.random.key(cfg.data_seed))
    ensembles, seconds = _fit_and_adapt(cfg, data)
    results = {
        "config": dataclasses.asdict(cfg),
        "rmse": {
            region: {
                name: rmse(thetas, data[f"x_test_{region}"], data[f"y_test_{region}"])
                for name, thetas in ensembles.items()
            }
            for region in ("old", "new")
        },
        "data": {k: v.tolist() for k, v in data.items() if "test" not in k},  # training points
        "grid": _grid(cfg, ensembles),
        "timing": {**seconds, "wall_s": time.perf_counter() - start},
    }
    atomic_write_json(path, results)
    return results


def rmse_table(results: Mapping[str, Any]) -> pd.DataFrame:
    """Our RMSEs beside the paper's (`PAPER`; NaN where it gives none), indexed by
    (region, ensemble)."""
    index = pd.MultiIndex.from_product(
        [("old", "new"), ("before", "new_only", "with_kl")], names=["region", "ensemble"]
    )
    return pd.DataFrame(
        {
            "ours": [results["rmse"][r][e] for r, e in index],
            "paper": [PAPER[f"{r}_rmse"].get(e, float("nan")) for r, e in index],
        },
        index=index,
    )
