"""Command line: `python -m forgetting_lib <command> ...` (also installed as `forgetting`).

Each command is one `add_parser` block in `build_parser` plus one `cmd_<name>(args)` function
that calls the library; heavy imports happen inside the command function. Errors a user can fix
(bad corpus spec, missing tokenizer, incomplete token file, a run folder in use, a full disk)
print one line, `error: ...`, and exit with 2; `--debug` (or FORGETTING_DEBUG=1) shows the
traceback instead. A run or sweep point that fails (a diverged loss) exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .config import ConfigError
from .engine.checkpoint import CheckpointError
from .engine.data import DataError
from .experiments.notebooks import NotebookError
from .fileio import FileFormatError, is_no_space, no_space_message
from .locks import LockedError
from .prep.binarize import TokenFileError
from .prep.corpora import CorpusError
from .prep.tokenizer import TokenizerError
from .runs import RunFolderError

USER_ERRORS: tuple[type[Exception], ...] = (
    CorpusError,
    TokenizerError,
    TokenFileError,
    ConfigError,
    DataError,
    RunFolderError,
    CheckpointError,
    NotebookError,
    FileFormatError,
    LockedError,
)


def cmd_tokenizer(args: argparse.Namespace) -> None:
    """Train a tokenizer on the given corpora and print its card."""
    from .prep.tokenizer import train_tokenizer

    tok = train_tokenizer(
        args.corpus,
        args.out,
        vocab_size=args.vocab_size,
        chars_per_corpus=args.chars_per_corpus,
        num_dataset_ids=args.num_dataset_ids,
        seed=args.seed,
        byte_fallback=not args.no_byte_fallback,
    )
    print(f"wrote {tok.directory} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint[:12]})")


def cmd_binarize(args: argparse.Namespace) -> None:
    """Binarize one corpus into a token file and print its sidecar."""
    from .prep.binarize import binarize

    meta = binarize(
        args.corpus,
        args.tokenizer,
        args.out,
        dataset_id=args.dataset_id,
        max_tokens=args.max_tokens,
        shuffle_documents=args.shuffle,
        seed=args.seed,
    )
    print(json.dumps(meta, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    """Pretrain (or finetune) per a parameter file with dotted overrides."""
    from pathlib import Path

    from . import config as config_lib
    from .engine import sharding
    from .engine.train import train_and_evaluate

    sharding.initialize_from_env()  # one process of a multi-host run (SLURM srun, or JAX_* variables)
    cfg = config_lib.load(args.params, args.overrides)
    out = Path(args.out) if args.out else Path("outputs") / cfg.run.experiment / cfg.run.name
    result = train_and_evaluate(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if not sharding.is_main_process():
        raise SystemExit(0 if result.status == "finished" else 1)
    print(
        json.dumps(
            {
                "out_dir": str(result.out_dir),
                "status": result.status,
                "stop_reason": result.stop_reason,
                "step": result.step,
                "tokens": result.tokens,
                "final": result.final,
            },
            indent=2,
        )
    )
    if result.status != "finished":
        last = result.final
        print(
            f"error: run {out} failed: {result.stop_reason}; its summary keeps the last finite "
            f"evaluation (step {last.get('step')}, valid_ntp {last.get('valid_ntp')}); lower opt.lr "
            f"or check the data, then start again with --overwrite",
            file=sys.stderr,
        )
        raise SystemExit(1)


def cmd_export(args: argparse.Namespace) -> None:
    """Write a finished run as a Hugging Face folder (engine/hf.py) that transformers loads."""
    from .engine.finetune import export_run

    out = export_run(args.run, args.out, dtype=args.dtype, reference_rows=args.reference_rows)
    print(f"wrote {out} (load it back with model.load_path=hf:{out})")


def cmd_quickstart(args: argparse.Namespace) -> None:
    """The walkthrough notebooks 01-04 on the built-in sample (forgetting_lib/experiments/quickstart.py)."""
    from .experiments import quickstart

    quickstart.run(args.out, args.params_dir, args.notebooks or None)


def cmd_notebook(args: argparse.Namespace) -> None:
    """Execute one notebook with papermill and a parameter file."""
    from .experiments.notebooks import run_notebook

    print(run_notebook(args.notebook, args.parameters, args.out, stream_output=True))


def cmd_sweep(args: argparse.Namespace) -> None:
    """Run (or resume) every point of a sweep spec and print the summary table."""
    from .experiments import sweep

    if args.dry_run:  # checks every point's config as a real run does, lists them and their cost
        from .experiments import cost

        points = sweep.check(args.spec)
        for point in points:
            print(f"{point.stage}/{point.id} -> {point.out_dir}")
        table = cost.cost_table(points, mfu=args.mfu, peak_tflops=args.peak_tflops)
        print(cost.format_table(table, mfu=args.mfu, peak_tflops=args.peak_tflops))
        return
    executor = None
    if args.executor != "local":  # the cluster gets every point at once (--workers does not apply)
        from .experiments import executors

        spec = sweep.load_spec(args.spec)
        out = spec.out
        sweep.check(args.spec)  # a bad spec fails before a cluster is started or joined
        for stage in spec.stages:
            if not stage.resources:
                print(
                    f"warning: stage {stage.name} has no `resources:`, so each of its points gets "
                    f"the cluster's defaults (one CPU, no GPU); add e.g. resources: {{gpus: 1, cpus: 8}}",
                    file=sys.stderr,
                )
        try:
            executor = (
                executors.RayExecutor(args.address)
                if args.executor == "ray"
                else executors.SlurmExecutor(args.slurm_folder or out / "submitit", partition=args.partition)
            )
        except executors.ClusterError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    with executor or contextlib.nullcontext():  # leaving it (Ctrl-C too) cancels unfinished points
        table = sweep.run_sweep(
            args.spec,
            workers=args.workers,
            notebook=not args.no_notebook,
            stages=args.stage or None,
            executor=executor,
        )
    if table["status"].isin(["failed", "blocked"]).any():  # a sweep that did not finish is not ok
        raise SystemExit(1)


def cmd_fit(args: argparse.Namespace) -> None:
    """Compile each stage's programs from shapes and print their memory and FLOPs (no data, no GPU)."""
    from . import runtime
    from .experiments import fit

    if args.devices:  # read when JAX first starts its CPU backend, which has not happened yet
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    runtime.configure()  # the persistent compilation cache: a second check is faster
    points = fit.load_points(args.spec, args.set or ())
    stages = list(dict.fromkeys(p.stage for p in points if not args.stages or p.stage in args.stages))
    print(f"compiling {', '.join(stages)} for {args.platform} (seconds to a minute per row)...", flush=True)
    table = fit.fit_table(
        points,
        platform=args.platform,
        dtype=args.dtype,
        device_memory_gb=args.device_memory_gb,
        stages=args.stages,
        on_row=lambda r: print(
            f"  {r['stage']}/{r['example']}: {r['peak_bytes'] / 2**30:.3g} GiB", flush=True
        ),
    )
    print(fit.format_table(table, device_memory_gb=args.device_memory_gb, platform=args.platform))
    if not table["fits"].all():  # scripts can test it
        raise SystemExit(1)


def cmd_reproduce(args: argparse.Namespace) -> None:
    """Data notebooks 01-02, then every figure notebook at one scale."""
    from . import figures

    results = figures.reproduce(args.scale, args.figures or None, args.out)
    failed = [name for name, value in results.items() if not isinstance(value, float)]
    print(
        f"reproduce: {len(results) - len(failed)} notebooks done, {len(failed)} failed"
        f"{': ' + ', '.join(failed) if failed else ''}; figures in {args.out}/{args.scale}"
    )
    if failed:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per pipeline step."""
    parser = argparse.ArgumentParser(prog="python -m forgetting_lib", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also FORGETTING_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    p.add_argument(
        "--corpus",
        action="append",
        required=True,
        help="corpus spec (repeat for several): sample:en, hf:NAME[:CONFIG], files:GLOB, synthetic:old",
    )
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--chars-per-corpus", type=int, default=2_000_000)
    p.add_argument("--num-dataset-ids", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="no 256 byte pieces (for corpora the sample covers fully, e.g. a synthetic: pair)",
    )
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser(
        "binarize", help="tokenize a corpus into a token file (uint16, uint32 past 65,536 ids)"
    )
    p.add_argument("--corpus", required=True, help="corpus spec, e.g. sample:en")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (ours, or a Hugging Face model's)")
    p.add_argument("--out", required=True, help="token file to write (NAME.bin; sidecar NAME.json)")
    p.add_argument("--dataset-id", type=int, required=True)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--shuffle", action="store_true", help="shuffle documents (finite corpora)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_binarize)

    p = sub.add_parser("export", help="write a finished run as a Hugging Face model folder")
    p.add_argument("run", help="finished run folder, e.g. outputs/quickstart/pretrain")
    p.add_argument("--out", required=True, help="folder to write (replaced if it is an earlier export)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument(
        "--reference-rows",
        type=int,
        default=0,
        help="also write reference_tokens.npy / reference_logits.npy: this many validation rows and "
        "our logits, to check the folder in transformers (tests/hf_fixtures/make_golden.py check-export)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="train a model from a parameter file")
    p.add_argument("params", help="YAML parameter file, e.g. params/quick/pretrain.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.D=192 opt.lr=1e-3")
    p.add_argument("--out", help="run folder (default outputs/<run.experiment>/<run.name>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="delete --out and start again")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "quickstart",
        help="run notebooks 01-04 (tokenizer, token files, pretraining, "
        "finetuning with replay) on the built-in sample",
    )
    p.add_argument("notebooks", nargs="*", help="only these notebooks, e.g. 03_pretrain (default: all)")
    p.add_argument("--out", default="outputs/quickstart", help="executed notebooks go to OUT/notebooks")
    p.add_argument(
        "--params-dir",
        default="params/quick",
        help="folder of <notebook>.yaml parameter files (they say where artefacts go)",
    )
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("sweep", help="run every point of a sweep spec (resumes; skips finished points)")
    p.add_argument("spec", help="sweep spec YAML, or a figure parameter file with a `sweep:` key")
    p.add_argument("--workers", type=int, default=1, help="points run at once (default 1)")
    p.add_argument(
        "--no-notebook",
        action="store_true",
        help="call the library directly instead of executing notebooks/train_run.ipynb per point",
    )
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    p.add_argument(
        "--executor",
        choices=("local", "ray", "slurm"),
        default="local",
        help="where points run: this machine (default), a Ray cluster, or SLURM jobs through submitit; "
        "each point asks for its stage's `resources:`",
    )
    p.add_argument(
        "--address",
        help="ray: the cluster to join (auto = the one this machine belongs to; default: start one here)",
    )
    p.add_argument(
        "--slurm-folder", help="slurm: folder for the job scripts and logs (default: <spec out>/submitit)"
    )
    p.add_argument("--partition", help="slurm: partition for the points whose stage's resources name none")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the points and their folders and print the planned tokens, FLOPs and "
        "accelerator-hours per stage; run nothing",
    )
    p.add_argument(
        "--mfu", type=float, default=0.4, help="dry run: model FLOPs utilisation assumed (default 0.4)"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dry run: accelerator peak TFLOP/s (default 989, H100 SXM dense bf16)",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "fit",
        help="will it fit? compile each stage's train step, evaluators and replay sampler from shapes "
        "(no data, no accelerator) and print FLOPs and peak memory against the device's",
    )
    p.add_argument("spec", help="sweep spec or figure parameter file (`sweep:` key), or a run config YAML")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        help="activation dtype to check (default: the config's model.dtype; auto = bfloat16 on gpu/tpu)",
    )
    p.add_argument(
        "--platform",
        choices=("gpu", "tpu", "cpu"),
        default="gpu",
        help="platform whose automatic settings (dtype, microbatches, batch sizes) are used (default gpu)",
    )
    p.add_argument(
        "--device-memory-gb", type=float, default=80.0, help="device memory in GB (1e9 bytes; default 80)"
    )
    p.add_argument("--stages", nargs="+", help="only these stages (default: all)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="dotted override for every point, e.g. --set data.microbatch_rows=64 (repeatable)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=0,
        help="simulate this many devices (forced CPU host devices) to check a config with `mesh:`, "
        "e.g. --devices 8 --set mesh.fsdp=-1; memory is then per device",
    )
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("reproduce", help="run the data notebooks and every figure notebook at a scale")
    p.add_argument("figures", nargs="*", help="only these figures, e.g. method_comp (default: all)")
    p.add_argument("--scale", default="quick", choices=("quick", "paper"))
    p.add_argument("--out", default="outputs/figures", help="executed notebooks go to OUT/SCALE/notebooks")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("notebook", help="execute one notebook with papermill")
    p.add_argument("notebook", help="name (03_pretrain) or path of the notebook")
    p.add_argument("-f", "--parameters", help="YAML parameter file, e.g. params/paper/03_pretrain.yaml")
    p.add_argument("--out", required=True, help="folder for the executed notebook")
    p.set_defaults(func=cmd_notebook)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `train`'s dotted overrides may also come after its options
    (`train P --out DIR model.D=64`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = args.command == "train" and all("=" in e and not e.startswith("-") for e in extra)
        if not overrides:
            hint = (
                " (train's dotted overrides look like section.key=value)" if args.command == "train" else ""
            )
            parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failed run, 2 user error)."""
    args = parse(argv)
    debug = args.debug or os.environ.get("FORGETTING_DEBUG") == "1"
    try:
        args.func(args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if debug or not is_no_space(err):
            raise
        folder = Path(err.filename).parent if err.filename else Path.cwd()
        what = f" writing {err.filename}" if err.filename else ""
        print(f"error: {err.strerror}{what}: {no_space_message(folder)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
