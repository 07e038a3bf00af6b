"""Continual learning on four algorithmic tasks (the paper's toy study): `tasks` (the tasks, exact
match, the continual-learning metrics), `train` (the sequential trainer with self-generated
replay), `plots`."""

from .plots import accuracy_curves, accuracy_heatmap
from .train import ToyConfig, compare_replay, load_config, summary_table, train_sequence

__all__ = [
    "ToyConfig",
    "accuracy_curves",
    "accuracy_heatmap",
    "compare_replay",
    "load_config",
    "summary_table",
    "train_sequence",
]
