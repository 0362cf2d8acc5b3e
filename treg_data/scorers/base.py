"""What every scorer takes and gives: requests of (prefix ids, response ids), the engine options, and
the Scorer interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

ScoreRequest = tuple[list[int], list[int]]  # (prefix ids, response ids)
# Per response token, the K most likely next tokens: ids [L, K] int32 and their log-probs [L, K] float32, by log-prob
# (most likely first), ties by token id.
TopK = tuple[np.ndarray, np.ndarray]
BACKENDS = ("vllm", "hf")


@dataclass(frozen=True)
class EngineOptions:
    model: str
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int = 4096
    engine: dict = field(default_factory=dict)  # vllm.LLM's own arguments (ScoreConfig's engine settings)
    batch_tokens: int = 16384  # hf back-end only: tokens per forward (padded)
    topk: int = 0  # the largest K `score_topk` will be asked for (vLLM sizes its max_logprobs by it); 0: never

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine.get("tensor_parallel_size", 1)


class Scorer(Protocol):
    scoring_path: str  # which scoring path ran, for the log and the manifest

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]: ...

    def score_topk(self, requests: list[ScoreRequest], k: int) -> list[TopK]: ...

    def close(self) -> None: ...


def sorted_topk(ids: np.ndarray, logps: np.ndarray) -> TopK:
    """Each row's K entries by log-prob, most likely first, ties by token id: one order whatever the back-end."""
    order = np.lexsort((ids, -logps), axis=-1)
    return (np.take_along_axis(ids, order, -1).astype(np.int32),
            np.take_along_axis(logps, order, -1).astype(np.float32))
