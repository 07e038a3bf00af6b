"""What only an accelerator can measure, in one short script (run it once when a GPU is lent).

Prints, and writes as JSON to `--out` (default benchmarks/results/accelerator.json):
1. the paper-size train step (D=1024, L=16, T=256, batch 256, activation dtype bf16 on an
   accelerator): ms/step, tokens/s, MFU against the card's dense bf16 peak (`--peak-tflops`, or
   the known peak of the device kind) and against a bf16 matmul timed in the same process;
2. one self-generated-replay KL finetune step at that size (the frozen parent's forward on the
   replay rows included), as a ratio to the plain step;
3. the KV-cache sampler at that size: tokens/s for the rows per call a run uses on accelerators;
4. device memory: the peak in use after those programs, next to `fit`'s ahead-of-time estimate
   for the same train step (engine/aot.py), so the estimate is checked against the real compile;
5. with `--figure NAME`, one quick figure end to end (`python -m forgetting_lib reproduce NAME`;
   the capacity figures need no download) and its wall time;
6. with `--instruct`, the paper-scale instruct step (params/paper/instruct_finetune.yaml: the
   Llama-3.2-1B shape with bf16 parameters and AdamW moments, batch 32 x 512) with random weights
   of that shape (no download): ms/step and peak memory, plain and with self-generated KL replay.

    python -m benchmarks.accelerator [--figure model_size] [--instruct] [--tiny]

`--tiny` runs the same code at a toy size (it is how the test suite keeps the script working on
a CPU); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from forgetting_lib import config as config_lib, runtime
from forgetting_lib.engine import aot, model as model_lib
from forgetting_lib.engine.replay import SAMPLE_ROWS
from forgetting_lib.engine.sampling import make_sampler, sample_from_id
from forgetting_lib.engine.step import auto_microbatches, make_objective, make_optimizer, make_train_step

PAPER = {"D": 1024, "L": 16, "H": 64, "V": 4096, "T": 256, "batch": 256}
TINY = {"D": 64, "L": 2, "H": 32, "V": 256, "T": 32, "batch": 16}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "GH200": 989.0}  # dense


def known_peak(device: Any) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def matmul_tflops(n: int, dtype: Any) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / timed(lambda: dot(a, a), 10) / 1e12


def step_seconds(
    size: dict[str, int], method: str, steps: int, cfg: config_lib.ModelConfig | None = None, micro: int = 0
) -> tuple[float, dict[str, Any]]:
    """Seconds per train step of `method` ("none", or "kl_pre" on self-generated rows); the model
    is `cfg` (else the paper's architecture at `size`), `micro` gradient-accumulation slices (0:
    automatic)."""
    cfg = cfg or config_lib.ModelConfig(D=size["D"], L=size["L"], H=size["H"], V=size["V"])
    T, B = size["T"], size["batch"]
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    optimizer = make_optimizer(config_lib.OptConfig(warmup_tokens=0), 0, None)
    opt_state = optimizer.init(params)
    reg = config_lib.RegConfig(method=method, coeff=1.0 if method != "none" else 0.0, synth=method != "none")
    hidden = model_lib.make_hidden(graphdef)
    ctx, replay_rows = ({}, 0) if method == "none" else ({"frozen": jax.tree.map(jnp.copy, params)}, B)
    micro = micro or auto_microbatches(B, T, 0, replay_rows)
    step = make_train_step(make_objective(hidden, reg), optimizer, micro)
    rng = np.random.default_rng(0)
    new = jnp.asarray(rng.integers(0, cfg.V, (B, T), dtype=np.int32))
    replay = jnp.asarray(rng.integers(0, cfg.V, (replay_rows, T), dtype=np.int32))
    state = [params, opt_state]

    def one() -> Any:
        state[0], state[1], out = step(state[0], state[1], ctx, new, replay)
        return out["ntp"]

    seconds = timed(one, steps)
    return seconds, {"model": cfg, "params": state[0], "graphdef": graphdef}  # the inputs were donated


def instruct_step(tiny: bool, steps: int, device: Any) -> dict[str, Any]:
    """The paper-scale instruct finetune step with random weights of the model's shape."""
    run = config_lib.load("params/paper/instruct_finetune.yaml")
    model = dataclasses.replace(run.model, load_path="")
    d = run.data
    size = {"T": d.T, "batch": d.batch_size}
    if tiny:
        model = dataclasses.replace(model, D=64, L=2, H=16, heads=4, kv_heads=2, F=128, V=512)
        size = {"T": 32, "batch": 8}
    micro = d.batch_size // d.microbatch_rows if d.microbatch_rows and not tiny else 0
    out: dict[str, Any] = {"params": model_lib.param_formula(model), "T": size["T"], "batch": size["batch"]}
    for method in ("none", "kl_pre"):
        seconds, _ = step_seconds(size, method, max(2, steps // 2), model, micro)
        stats = device.memory_stats() or {}
        out[method] = {"ms": seconds * 1e3, "peak_bytes_in_use": stats.get("peak_bytes_in_use")}
        peak = (stats.get("peak_bytes_in_use") or float("nan")) / 2**30
        print(
            f"instruct step ({out['params'] / 1e9:.2f}B params, {method}): {seconds * 1e3:.0f} ms, "
            f"peak memory so far {peak:.1f} GiB"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (keeps the script working on a CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak")
    parser.add_argument("--figure", default="", help="also run this quick figure end to end")
    parser.add_argument("--instruct", action="store_true", help="also the paper-scale instruct step (1B)")
    parser.add_argument("--out", default="benchmarks/results/accelerator.json")
    args = parser.parse_args()
    runtime.configure()
    size = TINY if args.tiny else PAPER
    device = jax.devices()[0]
    report: dict[str, Any] = {"device": str(getattr(device, "device_kind", device.platform)), "size": size}
    peak = args.peak_tflops or known_peak(device)
    matmul = matmul_tflops(
        512 if args.tiny else 8192, jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    )
    report["matmul_tflops"] = matmul
    print(f"device {report['device']} ({jax.device_count()} devices); timed matmul {matmul:,.1f} TFLOP/s")

    T, B = size["T"], size["batch"]
    plain_s, built = step_seconds(size, "none", args.steps)
    fpt = model_lib.flops_per_token(built["model"], T)
    achieved = B * T * fpt / plain_s / 1e12
    report["train_step"] = {
        "ms": plain_s * 1e3,
        "tokens_per_s": B * T / plain_s,
        "tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "of_timed_matmul": achieved / matmul,
    }
    mfu = f"MFU {achieved / peak:.1%} of {peak:.0f}" if peak else "MFU unknown (pass --peak-tflops)"
    print(f"train step: {plain_s * 1e3:.1f} ms, {B * T / plain_s:,.0f} tok/s, {achieved:.1f} TFLOP/s, {mfu}")

    kl_s, _ = step_seconds(size, "kl_pre", args.steps)
    report["kl_step"] = {"ms": kl_s * 1e3, "vs_plain": kl_s / plain_s}
    print(f"self-generated KL step ({B} replay rows): {kl_s * 1e3:.1f} ms = {kl_s / plain_s:.2f}x plain")

    rows = 64 if args.tiny else 4 * SAMPLE_ROWS
    sampler = make_sampler(built["graphdef"], length=T)
    sample_s = timed(lambda: sample_from_id(sampler, built["params"], 1, rows, jax.random.key(1)), 2)
    report["sampler"] = {"rows": rows, "tokens_per_s": rows * (T - 1) / sample_s}
    print(
        f"sampler: {rows} rows x {T - 1} tokens in {sample_s:.2f} s = {rows * (T - 1) / sample_s:,.0f} tok/s"
    )

    stats = device.memory_stats() or {}
    estimate = aot.step_report(
        config_lib.from_dict(
            {
                "model": {k: size[k] for k in ("D", "L", "H", "V")},
                "data": {"T": T, "batch_size": B, "valid_tokens": B * T},
                "stop": {"num_tokens_train": B * T},
            }
        )
    )
    in_use = stats.get("peak_bytes_in_use")
    report["memory"] = {
        "peak_bytes_in_use": in_use,  # after all the programs above (None where not reported)
        "fit_step_bytes": estimate["step_bytes"],
        "fit_peak_bytes": estimate["peak_bytes"],
        "fit_flops_per_step": estimate["flops_per_step"],
    }
    gib = {k: (v or float("nan")) / 2**30 for k, v in report["memory"].items() if "bytes" in k}
    print(
        f"memory: peak in use {gib['peak_bytes_in_use']:.2f} GiB; ahead-of-time estimate: train step "
        f"{gib['fit_step_bytes']:.2f} GiB, run {gib['fit_peak_bytes']:.2f} GiB"
    )

    if args.instruct:
        report["instruct"] = instruct_step(args.tiny, args.steps, device)

    if args.figure:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "forgetting_lib", "reproduce", args.figure])
        report["figure"] = {
            "name": args.figure,
            "seconds": time.perf_counter() - start,
            "rc": done.returncode,
        }
        print(f"figure {args.figure}: {report['figure']['seconds']:.0f} s (exit {done.returncode})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
