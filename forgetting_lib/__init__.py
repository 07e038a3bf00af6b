"""forgetting_lib: reproduce and extend the forgetting experiments of Marek et al. (2026).

The public surface: the names below (`import forgetting_lib as fl; fl.train_and_evaluate(...)`),
the `plots` and `methods` modules, and the `figures` package (one module per paper figure).
Notebooks and parameter files use only these; everything else may change freely.

Importing the package is cheap and does not import JAX: names are loaded on first use, so a
notebook can call `fl.configure()` (runtime settings that belong before JAX starts) first.

Layout: root = config, run folders, method names and plumbing; `prep/` text -> token files;
`engine/` one run; `experiments/` many runs and their drivers; `figures/` the paper's figures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module under forgetting_lib, attribute; None = the module itself)
_PUBLIC: dict[str, tuple[str, str | None]] = {
    # runtime and notebooks
    "configure": ("runtime", "configure"),
    "setup_notebook": ("experiments.notebooks", "setup"),
    "run_notebook": ("experiments.notebooks", "run_notebook"),
    "run_notebooks": ("experiments.notebooks", "run_notebooks"),
    # configuration and methods
    "Config": ("config", "Config"),
    "ConfigError": ("config", "ConfigError"),
    "load_config": ("config", "load"),
    "methods": ("methods", None),
    "METHODS": ("methods", "METHODS"),
    "REGULARISERS": ("engine.regularisers", "REGULARISERS"),
    # step 1-2: tokenizer and token files
    "Tokenizer": ("prep.tokenizer", "Tokenizer"),
    "load_tokenizer": ("prep.tokenizer", "load_tokenizer"),
    "train_tokenizer": ("prep.tokenizer", "train_tokenizer"),
    "train_or_load_tokenizer": ("prep.tokenizer", "train_or_load"),
    "compression_stats": ("prep.tokenizer", "compression_stats"),
    "binarize": ("prep.binarize", "binarize"),
    "binarize_or_reuse": ("prep.binarize", "binarize_or_reuse"),
    "document_lengths": ("prep.binarize", "document_lengths"),
    "open_rows": ("engine.data", "open_rows"),
    # step 3-4: one run
    "train_and_evaluate": ("engine.train", "train_and_evaluate"),
    "RunResult": ("engine.train", "RunResult"),
    "replay_examples": ("engine.finetune", "replay_examples"),
    "load_run": ("engine.finetune", "load_run"),
    "export_run": ("engine.finetune", "export_run"),
    # run folders
    "load_runs": ("runs", "load_runs"),
    "read_summary": ("runs", "read_summary"),
    "read_metrics": ("runs", "read_metrics"),
    "final_table": ("runs", "final_table"),
    "is_finished": ("runs", "is_finished"),
    # many runs
    "run_sweep": ("experiments.sweep", "run_sweep"),
    "load_stage": ("experiments.sweep", "load_stage"),
    "stage_status": ("experiments.sweep", "stage_status"),
    "load_spec": ("experiments.sweep_spec", "load_spec"),
    "run_quickstart": ("experiments.quickstart", "run"),
    "finetune_all": ("experiments.quickstart", "finetune_all"),
    "Explorer": ("experiments.explorer", "Explorer"),
    # plots and figures
    "plots": ("plots", None),
    "figures": ("figures", None),
    "reproduce": ("figures.reproduce", "reproduce"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562)."""
    try:
        module, attribute = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'forgetting_lib' has no attribute {name!r}") from None
    loaded = importlib.import_module(f"{__name__}.{module}")
    value = loaded if attribute is None else getattr(loaded, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what `__getattr__` returns, for type checkers and editors
    from . import figures, methods, plots
    from .config import Config, ConfigError, load as load_config
    from .engine.data import open_rows
    from .engine.finetune import export_run, load_run, replay_examples
    from .engine.regularisers import REGULARISERS
    from .engine.train import RunResult, train_and_evaluate
    from .experiments.explorer import Explorer
    from .experiments.notebooks import run_notebook, run_notebooks, setup as setup_notebook
    from .experiments.quickstart import finetune_all, run as run_quickstart
    from .experiments.sweep import load_stage, run_sweep, stage_status
    from .experiments.sweep_spec import load_spec
    from .figures.reproduce import reproduce
    from .methods import METHODS
    from .prep.binarize import binarize, binarize_or_reuse, document_lengths
    from .prep.tokenizer import (
        Tokenizer,
        compression_stats,
        load_tokenizer,
        train_or_load as train_or_load_tokenizer,
        train_tokenizer,
    )
    from .runs import final_table, is_finished, load_runs, read_metrics, read_summary
    from .runtime import configure
