"""Scorers: given (prefix ids, response ids) sequences, return log π(response token | prefix, earlier
response tokens) for every response token. Two back-ends with one interface:

- `vllm` (default): prompt log-prob scoring in the vLLM engine;
- `hf`: a plain transformers forward, the reference for parity tests and a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from treg_data.errors import UserError

ScoreRequest = tuple[list[int], list[int]]  # (prefix ids, response ids)


@dataclass(frozen=True)
class EngineOptions:
    model: str
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    seed: int = 0
    batch_tokens: int = 16384  # hf back-end only: tokens per forward (padded)


class Scorer(Protocol):
    scoring_path: str  # which scoring path ran, for the log and the manifest

    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def build_scorer(backend: str, options: EngineOptions) -> Scorer:
    if backend == "vllm":
        from treg_data.scorers.vllm_scorer import VLLMScorer

        return VLLMScorer(options)
    if backend == "hf":
        from treg_data.scorers.hf_scorer import HFScorer

        return HFScorer(options)
    raise UserError(f"unknown backend {backend!r}; choose vllm or hf")
