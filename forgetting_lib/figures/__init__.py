"""The paper's figures: one module per figure, holding its table (ours beside the paper's numbers),
its claim checks, its plot and the paper's numbers for it; the toy and 1-D regression studies as
subpackages that follow the same rule; `analysis` (forgetting at equal new-task loss, compute
multiplier, frontier) shared by all; `reproduce` runs every figure notebook.

A figure is a parameter file `params/<scale>/<figure>.yaml` (its `sweep:` key is the sweep spec of
its runs, the other keys the notebook's parameters) plus `notebooks/figures/<figure>.ipynb`, which
runs the sweep and calls its module: `table(...)`, `claims(...)`, `plot(...)`. A claim check
returns {claim: (holds, the numbers behind it)}.
"""

from . import analysis, high_lr, learning_rate, method_comp, regression1d, replay_diagnostics, toy_continual
from .common import claims_frame, completeness, figure_spec
from .reproduce import DATA_NOTEBOOKS, FIGURES, reproduce

__all__ = [
    "DATA_NOTEBOOKS",
    "FIGURES",
    "analysis",
    "claims_frame",
    "completeness",
    "figure_spec",
    "high_lr",
    "learning_rate",
    "method_comp",
    "regression1d",
    "replay_diagnostics",
    "reproduce",
    "toy_continual",
]
