"""The token reward of docs/METHOD.md §2 (paper Eq. 3)."""

from __future__ import annotations

import numpy as np

REWARD_TRANSFORM = "sigmoid(better_logps - worse_logps) - 0.5"


def contrastive_rewards(better_logps: np.ndarray, worse_logps: np.ndarray) -> np.ndarray:
    """r̂_t = σ(log π(y_t | x_better, y_<t) − log π(y_t | x_worse, y_<t)) − 0.5, in (−0.5, 0.5).

    σ(d) − 0.5 = tanh(d / 2) / 2, which stays exact for large |d| where exp would overflow.
    """
    diff = np.asarray(better_logps, dtype=np.float64) - np.asarray(worse_logps, dtype=np.float64)
    return (0.5 * np.tanh(0.5 * diff)).astype(np.float32)
