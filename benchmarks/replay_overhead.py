"""Per-step cost of the replay methods at the tutorial size, all in one process.

Times the jitted train step for plain finetuning, KL replay on real rows, and KL replay on
self-generated rows (the sampling of buffer x replay rows amortised over the `buffer` steps that
use them), and the sampler's tokens/s. Prints each as ms/step and as a ratio to plain.

    python -m benchmarks.replay_overhead [--replay-batch 8] [--buffer 16]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from forgetting_lib import config as config_lib, runtime
from forgetting_lib.engine import model as model_lib
from forgetting_lib.engine.sampling import make_sampler, sample_from_id
from forgetting_lib.engine.step import auto_microbatches, make_objective, make_optimizer, make_train_step

D, L, H, T, B, V = 128, 4, 32, 128, 32, 4096


def time_steps(method: str, replay_rows: int, steps: int) -> float:
    """Seconds per train step of `method` with `replay_rows` replay rows per step."""
    cfg = config_lib.ModelConfig(D=D, L=L, H=H, V=V)
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    frozen = jax.tree.map(lambda x: x + 0, params)
    optimizer = make_optimizer(config_lib.OptConfig(warmup_tokens=0), 0, None)
    objective = make_objective(
        model_lib.make_hidden(graphdef), config_lib.RegConfig(method=method, coeff=1.0)
    )
    step = make_train_step(objective, optimizer, auto_microbatches(B, T, 0, replay_rows))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    new = rng.integers(0, V, (B, T), dtype=np.int32)
    replay = rng.integers(0, V, (replay_rows, T), dtype=np.int32)
    ctx = {"frozen": frozen}
    for _ in range(2):
        params, opt_state, out = step(params, opt_state, ctx, new, replay)
    out["ntp"].block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, out = step(params, opt_state, ctx, new, replay)
    out["ntp"].block_until_ready()
    return (time.perf_counter() - start) / steps


def time_sampling(rows: int) -> float:
    """Seconds to sample `rows` rows of T tokens from the tutorial model (after compiling)."""
    graphdef, params = model_lib.init_model(config_lib.ModelConfig(D=D, L=L, H=H, V=V), key=jax.random.key(0))
    sampler = make_sampler(graphdef, length=T)
    sample_from_id(sampler, params, 2, rows, jax.random.key(0)).block_until_ready()
    start = time.perf_counter()
    sample_from_id(sampler, params, 2, rows, jax.random.key(1)).block_until_ready()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replay-batch", type=int, default=8)
    parser.add_argument("--buffer", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    runtime.configure()
    R = args.replay_batch
    plain = time_steps("none", 0, args.steps)
    kl = time_steps("kl_pre", R, args.steps)
    sample_s = time_sampling(args.buffer * R)
    self_kl = kl + sample_s / args.buffer
    sampled_tokens = args.buffer * R * (T - 1)
    print(
        f"tutorial model D={D} L={L} T={T} batch {B}, replay batch {R}, buffer {args.buffer}, "
        f"backend {jax.default_backend()}"
    )
    print(f"{'method':<28} {'ms/step':>9} {'x plain':>8}")
    for name, sec in [
        ("plain finetuning", plain),
        ("KL replay, real rows", kl),
        ("KL replay, self-generated", self_kl),
    ]:
        print(f"{name:<28} {sec * 1e3:>9.1f} {sec / plain:>8.2f}")
    print(f"self-generated / real KL per step: {self_kl / kl:.2f}x (target <= 1.5x)")
    print(f"sampler: {sampled_tokens / sample_s:,.0f} tokens/s ({args.buffer * R} rows in {sample_s:.2f} s)")


if __name__ == "__main__":
    main()
