"""The 1-D regression illustration (the paper's Fig. 2): `study` fits and adapts an SGHMC ensemble
(with the paper's RMSEs), `plots` draws its predictions."""

from .plots import predictions
from .study import PAPER, Regression1DConfig, rmse_table, run

__all__ = ["PAPER", "Regression1DConfig", "predictions", "rmse_table", "run"]
