"""The main job on the built-in sample: the numbered notebooks 01-04, run by papermill.

`run()` executes notebooks/01_tokenizer .. 04_finetune_replay with `params/quick/<name>.yaml`
(tokenizer -> token files -> pretraining -> finetuning on Spanish three ways) and writes the
executed notebooks to `<out>/notebooks/`; the artefacts go where the parameter files say
(`outputs/quickstart/...` for the quick ones). Every step skips work that is already complete (a
finished run is not retrained, an existing tokenizer and token files made with it are reused), so
rerunning after an interruption continues. `finetune_all` is what notebook 04 calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import config as config_lib, methods as methods_lib
from .notebooks import WALKTHROUGH, run_notebooks

# The three finetuning runs of the quickstart (names of methods.METHODS): standard finetuning,
# self-generated KL replay, real KL replay.
FINETUNES = ("standard", "kl_self", "kl_real")


def finetune_all(
    run_config: str | Path | Mapping[str, Any],
    parent_dir: str | Path,
    data_path: str | Path,
    runs_dir: str | Path,
    *,
    methods: Sequence[str | Mapping[str, Any]] | Mapping[str, Any] = FINETUNES,
    overrides: Mapping[str, Any] | None = None,
    prefix: str = "finetune_es_",
    resume: bool = True,
) -> dict[str, Any]:
    """Finetune `parent_dir` on `data_path` once per method, each in `runs_dir/<prefix><name>`;
    returns {name: RunResult}. `methods` are names of the method table, optionally refined
    (`["standard", {"ewc": {"reg.coeff": 1000.0}}]`), or a mapping name -> dotted overrides
    (see `methods.named`), applied after `overrides`. Finished runs are returned as they are."""
    from ..engine.train import train_and_evaluate

    results = {}
    for name, method in methods_lib.named(methods).items():
        cfg = config_lib.load(
            run_config,
            [
                ("model.load_path", str(parent_dir)),
                ("data.path", str(data_path)),
                *(overrides or {}).items(),
                *method.items(),
            ],
        )
        results[name] = train_and_evaluate(cfg, Path(runs_dir) / f"{prefix}{name}", resume=resume)
    return results


def run(
    out: str | Path = "outputs/quickstart",
    params_dir: str | Path = "params/quick",
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Execute the walkthrough notebooks (all of 01-04, or `names`) with
    `<params_dir>/<name>.yaml`; executed copies go to `<out>/notebooks/`. Returns {name: seconds}."""
    start = time.perf_counter()
    seconds = run_notebooks(names or WALKTHROUGH, params_dir, Path(out) / "notebooks")
    table = result_table(params_dir)
    if table is not None:
        print(
            "quickstart: the finetunes of notebook 04 (valid = Spanish, prev = English loss in "
            "nats/token; forgetting = English loss now minus the parent's)\n"
            + table.to_string(float_format=lambda v: f"{v:.4f}"),
            flush=True,
        )
    print(
        f"quickstart: {len(seconds)} notebooks in {time.perf_counter() - start:.0f} s; executed "
        f"notebooks in {Path(out) / 'notebooks'}, figures in {Path(out) / 'figures'}",
        flush=True,
    )
    return seconds


def result_table(params_dir: str | Path = "params/quick") -> Any:
    """The final table of notebook 04's runs as `<params_dir>/04_finetune_replay.yaml` names them
    (a DataFrame; None where none of them exists yet)."""
    from .. import runs
    from .notebooks import load_parameters, parameters_of

    name = WALKTHROUGH[-1]
    path = Path(params_dir) / f"{name}.yaml"
    values = {**parameters_of(name), **(load_parameters(path) if path.is_file() else {})}
    folders = [
        Path(values["runs_dir"]) / f"{values['run_prefix']}{method}"
        for method in methods_lib.named(values["methods"])
    ]
    existing = [f for f in folders if (f / runs.CONFIG).exists()]
    return runs.final_table(existing) if existing else None
