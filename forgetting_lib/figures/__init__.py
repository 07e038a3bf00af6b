"""The paper's figures: one module per figure, holding its table (ours beside the paper's numbers),
its claim checks, its plot and the paper's numbers for it; the toy and 1-D regression studies as
subpackages that follow the same rule; `analysis` (forgetting at equal new-task loss, compute
multiplier, frontier) shared by all; `capacity` what the four capacity figures (model_size,
pretrain_length, model_capacity, 2d_grid in `grid2d`) share: their synthetic data and its loss
floor, and the best finetune at the target per pretrained model; `reproduce` runs every figure notebook.

A figure is a parameter file `params/<scale>/<figure>.yaml` (its `sweep:` key is the sweep spec of
its runs, the other keys the notebook's parameters) plus `notebooks/figures/<figure>.ipynb`, which
runs the sweep and calls its module: `table(...)`, `claims(...)`, `plot(...)`. A claim check
returns {claim: (holds, the numbers behind it)}.
"""

from . import (
    analysis,
    capacity,
    grid2d,
    high_lr,
    instruct,
    learning_rate,
    method_comp,
    model_capacity,
    model_size,
    pretrain_length,
    regression1d,
    replay_diagnostics,
    toy_continual,
)
from .common import claims_frame, completeness, figure_spec
from .reproduce import DATA_NOTEBOOKS, FIGURES, reproduce

__all__ = [
    "DATA_NOTEBOOKS",
    "FIGURES",
    "analysis",
    "capacity",
    "claims_frame",
    "completeness",
    "figure_spec",
    "grid2d",
    "high_lr",
    "instruct",
    "learning_rate",
    "method_comp",
    "model_capacity",
    "model_size",
    "pretrain_length",
    "regression1d",
    "replay_diagnostics",
    "reproduce",
    "toy_continual",
]
