"""The paper's reported numbers (../shared/PAPER.md), for tables that put ours beside them.

Marek et al., *Forgetting in Language Models: Capacity, Optimization, and Self-Generated Replay*
(arXiv 2605.26097). Values are nats/token unless a key says otherwise; numbers read off the
published figures are accurate to about +-0.001 nats. Each figure's scale differs from our quick
scale (tiny model on the built-in Bible sample), so only the *pattern* is expected to match.
"""

from __future__ import annotations

# method_comp: 205M model (D=1024, L=16), FineWeb-Edu -> Nemotron-CC-Math, FT LR 1e-5.
# Forgetting = old-data loss increase over the start (2.224), all runs at math loss ~1.37.
METHOD_COMP = {
    "old_loss_start": 2.224,
    "forgetting": {"standard": 0.113, "lora_r16": 0.140, "ntp_real": 0.005, "ntp_self": 0.006,
                   "kl_real": 0.003, "kl_self": 0.003},
    "new_loss": {"standard": 1.37, "lora_r16": 1.45, "ntp_real": 1.37, "ntp_self": 1.37,
                 "kl_real": 1.37, "kl_self": 1.37},
}

# high_lr: English checkpoint (old loss ~3.63), FT on Spanish to 3.3, x = pure train-step time.
HIGH_LR = {
    "old_loss_start": 3.63,
    "best_low_lr": 1e-5, "best_low_lr_old_loss": 3.639, "best_low_lr_time_s": 108.6,
    "replay_lr": 1e-3, "replay_fraction": (1 / 64, 1 / 32), "replay_time_s": 2.9,
    "speedup": 38.0,
    "claim": ">= 1/32 replay ends below the starting old loss",
}

# 1d_regression: MLP 1-48-48-24-1 tanh, SGHMC ensemble (4 chains x 80 particles).
REGRESSION_1D = {
    "old_rmse": {"before": 0.059, "new_only": 0.520, "with_kl": 0.097},
    "new_rmse": {"new_only": 0.176, "with_kl": 0.178},
}
