"""Self-generated replay throughput: sampled tokens per second of `make_sampler` (KV cache,
temperature 1, prompt = one dataset-id token, T - 1 sampled tokens per row); with `--top-p`,
also nucleus sampling (an ablation), timed against the full softmax in the same process.

Rows per call matter: self-generated replay samples several replay chunks per call
(`replay.auto_chunks_per_call`, about `replay.SAMPLE_ROWS` rows), where decoding runs faster.

    python -m benchmarks.sampling [--sizes tutorial32,tutorial128,...] [--dtypes float32,bfloat16]
                                  [--top-p 1.0,0.8]
"""

from __future__ import annotations

import argparse
import time

import jax

from forgetting_lib import config as config_lib, runtime
from forgetting_lib.engine import model as model_lib
from forgetting_lib.engine.sampling import make_sampler, sample_from_id

SIZES = {  # name: (D, L, H, T, batch)
    "tutorial32": (128, 4, 32, 128, 32),
    "tutorial128": (128, 4, 32, 128, 128),
    "tutorial256": (128, 4, 32, 128, 256),  # replay.SAMPLE_ROWS: one call's rows on a CPU
    "tutorial512": (128, 4, 32, 128, 512),
    "default64": (256, 6, 64, 256, 64),
}


def time_sampler(
    cfg: config_lib.ModelConfig, T: int, batch: int, repeats: int, top_p: float = 1.0
) -> tuple[float, float]:
    """(seconds of the first call, incl. compile; best seconds per call after it)."""
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    sample = make_sampler(graphdef, length=T, top_p=top_p)
    start = time.perf_counter()
    sample_from_id(sample, params, 1, batch, jax.random.key(0)).block_until_ready()
    first = time.perf_counter() - start
    best = float("inf")
    for i in range(repeats):
        start = time.perf_counter()
        sample_from_id(sample, params, 1, batch, jax.random.key(i + 1)).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return first, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--top-p", default="1.0", help="comma-separated nucleus masses (1.0 = full softmax)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runtime.configure()
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    print(
        f"{'size':<12} {'dtype':<9} {'top_p':>5} {'D':>4} {'L':>2} {'T':>4} {'B':>4} {'first s':>8} "
        f"{'s/call':>8} {'ms/pos':>7} {'tok/s':>10} {'x full':>6}"
    )
    for name in args.sizes.split(","):
        D, L, H, T, B = SIZES[name]
        for dtype in args.dtypes.split(","):
            cfg = config_lib.ModelConfig(D=D, L=L, H=H, V=4096, dtype=dtype)
            full = None
            for top_p in map(float, args.top_p.split(",")):
                first, sec = time_sampler(cfg, T, B, args.repeats, top_p)
                full = sec if top_p == 1.0 else full
                ratio = f"{sec / full:>6.2f}" if full else f"{'-':>6}"
                print(
                    f"{name:<12} {dtype:<9} {top_p:>5.2f} {D:>4} {L:>2} {T:>4} {B:>4} {first:>8.2f} "
                    f"{sec:>8.3f} {sec / (T - 1) * 1e3:>7.2f} {B * (T - 1) / sec:>10,.0f} {ratio}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
