"""Cold start: seconds from launching a fresh Python process to its first finished train step,
and what they are spent on, at the tutorial size (params/quick/pretrain.yaml, D=128 L=4 T=128,
batch 32) and for the quickstart's self-generated-KL finetune of that model.

Each case runs in new processes sharing one private compilation cache: the first with the cache
empty (everything compiles), the next ones with it warm (what a user meets from the second run
of a setting on). Run `make quickstart` first (it writes the sample data and the parent).

    python -m benchmarks.cold_start [--repeats 2]

Printed per process: interpreter + imports, setup (data, model, parent, optimizer), compile_all
(tracing, and compiling or loading from the cache), the step-0 evaluation, the first train
step, and the total.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARENT = ROOT / "outputs/quickstart/runs/pretrain_en"

CASES = {  # name: (params file, dotted overrides)
    "pretrain": (
        "params/quick/pretrain.yaml",
        {"data.path": "outputs/quickstart/data/en.bin", "stop.target_loss": None},
    ),
    "finetune_kl_self": (
        "params/quick/finetune.yaml",
        {
            "model.load_path": str(PARENT),
            "data.path": "outputs/quickstart/data/es.bin",
            "method": "kl_self",
            "stop.target_loss": None,
        },
    ),
}

# The child: timestamps (time.time(), comparable across processes) at each phase's end.
CHILD = r"""
import json, sys, time
marks = {}
from forgetting_lib import config as config_lib
from forgetting_lib.engine import train
marks["imports"] = time.time()
params, overrides, out = json.loads(sys.argv[1])

def after(name, fn, key=None):
    def wrapped(*a, **k):
        if key and key not in marks:
            marks[key + "_start"] = time.time()
        result = fn(*a, **k)
        marks.setdefault(name, time.time())
        return result
    return wrapped

train.compile_all = after("compile", train.compile_all, key="compile")
train._evaluate = after("eval0", train._evaluate)
train._train_interval = after("first_step", train._train_interval)
overrides = [*overrides.items(), ("log.progress", False), ("log.every_tokens", 4096),
             ("stop.num_tokens_train", 4096)]
train.train_and_evaluate(config_lib.load(params, overrides), out)
print("MARKS" + json.dumps(marks))
"""


def run_child(case: str, cache: Path, out: Path) -> dict[str, float]:
    params, overrides = CASES[case]
    env = {**os.environ, "FORGETTING_JAX_CACHE": str(cache)}
    launched = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([params, overrides, str(out)])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{case}: the child failed:\n{done.stderr[-2000:]}")
    marks = json.loads(done.stdout.split("MARKS", 1)[1])
    return {
        "imports": marks["imports"] - launched,
        "setup": marks["compile_start"] - marks["imports"],
        "compile": marks["compile"] - marks["compile_start"],
        "eval0": marks["eval0"] - marks["compile"],
        "step": marks["first_step"] - marks["eval0"],
        "total": marks["first_step"] - launched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="warm-cache processes per case")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    if not (PARENT / "summary.json").is_file():
        raise SystemExit(f"no parent at {PARENT}: run `make quickstart` first")
    columns = ("imports", "setup", "compile", "eval0", "step", "total")
    print(f"{'case':<18} {'cache':<6} " + " ".join(f"{c:>8}" for c in columns) + "   (seconds)")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            cache = Path(tmp) / f"cache_{case}"
            for i in range(1 + args.repeats):
                split = run_child(case, cache, Path(tmp) / f"{case}_{i}")
                label = "empty" if i == 0 else "warm"
                print(f"{case:<18} {label:<6} " + " ".join(f"{split[c]:8.2f}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
