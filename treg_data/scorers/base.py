"""What every scorer takes and gives: requests of (prefix ids, response ids), the engine options, and
the Scorer interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

ScoreRequest = tuple[list[int], list[int]]  # (prefix ids, response ids)
BACKENDS = ("vllm", "hf")


@dataclass(frozen=True)
class EngineOptions:
    model: str
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int = 4096
    engine: dict = field(default_factory=dict)  # vllm.LLM's own arguments (ScoreConfig's engine settings)
    batch_tokens: int = 16384  # hf back-end only: tokens per forward (padded)

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine.get("tensor_parallel_size", 1)


class Scorer(Protocol):
    scoring_path: str  # which scoring path ran, for the log and the manifest

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]: ...

    def close(self) -> None: ...
