"""Whole finetuning runs, not steps: wall time and where it goes, for plain, real-KL and
self-generated-KL finetuning of the quickstart's English model on Spanish, all in one process.

Two settings (the quickstart's sample data and parent; run `make quickstart` first):
- tutorial: the authors' tutorial finetune, 500K Spanish tokens at batch 32, LR 3e-4, evaluation
  every 100K tokens on 100K Spanish validation tokens and the parent's 50K English ones; KL
  replay with 16 rows per step, coefficient 10, self-generated rows refilled every 8 steps;
- quickstart: params/quick/finetune.yaml as notebook 04 runs it (stops at Spanish loss 5.8).

Per run: the wall of the whole call (setup, compile, loop) and its split into train steps,
sampling, evaluation, compile and the rest (data, parent, checkpoint, summary), the ratio of
each method's wall to plain finetuning's, and the sampler's tokens/s inside the run.

    python -m benchmarks.finetune_wall [--settings tutorial,quickstart] [--methods standard,kl_real,kl_self]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARENT = ROOT / "outputs/quickstart/runs/pretrain_en"
DATA = ROOT / "outputs/quickstart/data/es.bin"

SETTINGS = {  # name: dotted overrides of params/quick/finetune.yaml
    "tutorial": {
        "stop.num_tokens_train": 500_000,
        "stop.target_loss": None,
        "data.valid_tokens": 100_000,
        "log.every_tokens": 100_000,
        "opt.lr": 3e-4,
        "reg.coeff": 10.0,
        "reg.replay_batch_size": 16,
        "reg.buffer": 8,
    },
    "quickstart": {},
}
METHODS = ("standard", "kl_real", "kl_self")


def run_once(setting: str, method: str, parent: Path, data: Path, out: Path) -> dict:
    """One fresh finetune; returns its summary plus the wall of the whole call."""
    from forgetting_lib import config as config_lib, methods as methods_lib, runs
    from forgetting_lib.engine.train import train_and_evaluate

    overrides = [
        ("model.load_path", str(parent)),
        ("data.path", str(data)),
        ("log.progress", False),
        *methods_lib.get(method).overrides.items(),
        *SETTINGS[setting].items(),
    ]
    cfg = config_lib.load(ROOT / "params/quick/finetune.yaml", overrides)
    start = time.perf_counter()
    train_and_evaluate(cfg, out / f"{setting}_{method}")
    wall = time.perf_counter() - start
    summary = runs.read_summary(out / f"{setting}_{method}")
    summary["sampled_tokens"] = summary["sampled_rows"] * (cfg.data.T - 1)  # T - 1 drawn per row
    summary["call_wall_s"] = wall
    return summary


def report(setting: str, results: dict[str, dict]) -> None:
    base = results.get("standard")
    print(f"\n{setting}: {next(iter(results.values()))['tokens']:,} tokens (standard run)")
    print(
        f"{'method':<10} {'steps':>5} {'wall s':>7} {'x plain':>7} {'train':>6} {'sample':>6} "
        f"{'eval':>6} {'compile':>7} {'rest':>5} {'eval %':>6} {'sample %':>8} {'sampler tok/s':>13}"
    )
    for name, s in results.items():
        sample = s["sample_time_s"]
        train = s["train_time_s"] - sample  # train_time_s includes preparing batches and sampling
        rest = s["call_wall_s"] - s["train_time_s"] - s["eval_time_s"] - s["compile_time_s"]
        ratio = s["call_wall_s"] / base["call_wall_s"] if base else float("nan")
        tok_s = s["sampled_tokens"] / sample if sample else float("nan")
        print(
            f"{name:<10} {s['step']:>5} {s['call_wall_s']:>7.1f} {ratio:>7.2f} {train:>6.1f} "
            f"{sample:>6.1f} {s['eval_time_s']:>6.1f} {s['compile_time_s']:>7.1f} {rest:>5.1f} "
            f"{100 * s['eval_time_s'] / s['call_wall_s']:>5.0f}% {100 * sample / s['call_wall_s']:>7.0f}% "
            f"{tok_s:>13,.0f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--parent", type=Path, default=PARENT, help="the English run to finetune")
    parser.add_argument("--data", type=Path, default=DATA, help="the Spanish token file")
    args = parser.parse_args()
    if not (args.parent / "summary.json").is_file() or not args.data.is_file():
        raise SystemExit(
            f"finetune_wall needs the quickstart's parent run {args.parent} and token file {args.data}: "
            f"run `make quickstart` first (or pass --parent and --data)"
        )
    import jax

    from forgetting_lib import runtime

    runtime.configure()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); parent {args.parent}")
    with tempfile.TemporaryDirectory(prefix="finetune_wall_") as tmp:
        for setting in args.settings.split(","):
            results = {
                m: run_once(setting, m, args.parent, args.data, Path(tmp)) for m in args.methods.split(",")
            }
            report(setting, results)


if __name__ == "__main__":
    main()
