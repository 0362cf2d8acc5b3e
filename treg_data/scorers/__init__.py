"""Scorers: given (prefix ids, response ids) sequences, return log π(response token | prefix, earlier
response tokens) for every response token, and (`score_topk`, treg-score --ref-topk) the K most likely tokens
at each response position with their log-probs. Two back-ends with one interface:

- `vllm` (default): prompt log-prob scoring in the vLLM engine;
- `hf`: a plain transformers forward, the reference for parity tests and a fallback.
"""

from __future__ import annotations

from treg_core.errors import UserError
from treg_data.scorers.base import BACKENDS, EngineOptions, Scorer, ScoreRequest, TopK

__all__ = ["BACKENDS", "EngineOptions", "ScoreRequest", "Scorer", "TopK", "build_scorer"]


def build_scorer(backend: str, options: EngineOptions) -> Scorer:
    if backend == "vllm":
        from treg_data.scorers.vllm_scorer import VLLMScorer

        return VLLMScorer(options)
    if backend == "hf":
        from treg_data.scorers.hf_scorer import HFScorer

        return HFScorer(options)
    raise UserError(f"unknown backend {backend!r}; choose vllm or hf")
