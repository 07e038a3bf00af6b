"""Train-step throughput against the machine's own matmul rate, measured in the same process.

Prints, per model size: tokens/s, model FLOPs per token (6 N + 12 L T D), achieved FLOP/s, and
that as a fraction of a 2048x2048 f32 `jnp.dot` timed here (and of the GPU's bf16 peak when one is
present). Also the evaluation share of a tutorial-scale run's wall time.

    python -m benchmarks.train_throughput [--sizes tutorial,default] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from forgetting_lib import config as config_lib, runtime
from forgetting_lib.engine import model as model_lib
from forgetting_lib.engine.assemble import auto_eval_rows
from forgetting_lib.engine.evaluate import make_evaluator
from forgetting_lib.engine.step import auto_microbatches, make_objective, make_optimizer, make_train_step

SIZES = {  # name: (D, L, H, T, batch)
    "tutorial": (128, 4, 32, 128, 32),
    "default": (256, 6, 64, 256, 64),
    "paper205m": (1024, 16, 64, 256, 256),
}


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32, repeats: int = 20) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = dot(a, a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def time_train_step(cfg: config_lib.ModelConfig, T: int, batch: int, steps: int) -> float:
    """Seconds per train step (compiled once, then `steps` timed steps with fresh batches)."""
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    optimizer = make_optimizer(config_lib.OptConfig(warmup_tokens=0), 0, None)
    opt_state = optimizer.init(params)
    objective = make_objective(model_lib.make_hidden(graphdef), config_lib.RegConfig())
    step = make_train_step(objective, optimizer, auto_microbatches(batch, T))
    no_replay = np.zeros((0, T), np.int32)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, cfg.V, (batch, T), dtype=np.int32) for _ in range(4)]
    for i in range(3):  # compile + warm up
        params, opt_state, out = step(params, opt_state, {}, batches[i % 4], no_replay)
    out["ntp"].block_until_ready()
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, out = step(params, opt_state, {}, batches[i % 4], no_replay)
    out["ntp"].block_until_ready()
    return (time.perf_counter() - start) / steps


def time_eval_tokens(cfg: config_lib.ModelConfig, T: int, eval_batch: int, tokens: int) -> float:
    """Seconds to evaluate `tokens` validation tokens with the jitted scan evaluator."""
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    nb = max(1, tokens // (T * eval_batch))
    data = jnp.asarray(np.random.default_rng(0).integers(0, cfg.V, (nb, eval_batch, T), dtype=np.int32))
    mask = jnp.ones((nb, eval_batch), jnp.float32)
    evaluate = make_evaluator(model_lib.make_hidden(graphdef))
    jax.block_until_ready(evaluate(params, None, data, mask))
    start = time.perf_counter()
    jax.block_until_ready(evaluate(params, None, data, mask))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tutorial,default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    runtime.configure()
    backend = jax.default_backend()
    peak = matmul_flops_per_s(dtype=jnp.float32 if backend == "cpu" else jnp.bfloat16)
    print(
        f"backend={backend} devices={jax.devices()} dtype={args.dtype} "
        f"matmul rate (2048^2 jnp.dot, {'f32' if backend == 'cpu' else 'bf16'}) = {peak / 1e9:,.1f} GFLOP/s"
    )
    print(
        f"{'size':<10} {'D':>5} {'L':>3} {'T':>4} {'B':>4} {'ms/step':>9} {'tok/s':>10} "
        f"{'MFLOP/tok':>10} {'GFLOP/s':>9} {'of matmul':>9}"
    )
    for name in args.sizes.split(","):
        D, L, H, T, B = SIZES[name]
        cfg = config_lib.ModelConfig(D=D, L=L, H=H, V=4096, dtype=args.dtype)
        sec = time_train_step(cfg, T, B, args.steps)
        tps = B * T / sec
        fpt = model_lib.flops_per_token(cfg, T)
        print(
            f"{name:<10} {D:>5} {L:>3} {T:>4} {B:>4} {sec * 1e3:>9.1f} {tps:>10,.0f} "
            f"{fpt / 1e6:>10.2f} {tps * fpt / 1e9:>9.1f} {tps * fpt / peak:>9.1%}"
        )
        if name == "tutorial":
            # Tutorial run: 1M train tokens, evaluation every 100K tokens on 100K valid tokens.
            train_s = 1_000_000 / tps
            eval_s = 10 * time_eval_tokens(cfg, T, auto_eval_rows(T), 100_000)
            print(
                f"  tutorial run estimate: train {train_s:.1f} s + eval {eval_s:.1f} s "
                f"(eval = {eval_s / (train_s + eval_s):.1%} of wall time)"
            )


if __name__ == "__main__":
    main()
