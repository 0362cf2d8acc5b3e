"""Reference scorer: a plain transformers forward with the same interface as the vLLM scorer,
through the kernel the training policy uses (treg_core.forward). Sequences are sorted by length
and batched to a token budget, right-padded; only the response rows go through the output
projection.
"""

from __future__ import annotations

import numpy as np
import torch

from treg_core.forward import TokenLogprobs, response_positions, right_padded
from treg_core.precision import DTYPES
from treg_data.scorers.base import EngineOptions, ScoreRequest


class HFScorer:
    scoring_path = "transformers_forward"

    def __init__(self, options: EngineOptions):
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES.get(options.dtype, "auto")
        model = AutoModelForCausalLM.from_pretrained(options.model, revision=options.revision, dtype=dtype)
        self.model = TokenLogprobs(model).to(self.device).eval()
        self.batch_tokens = options.batch_tokens

    def close(self) -> None:
        pass

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
        for batch in _token_budget_batches(order, requests, self.batch_tokens):
            for index, logps in zip(batch, self._score_batch([requests[i] for i in batch])):
                results[index] = logps
        return results

    def _score_batch(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        input_ids, attention_mask, position_ids = right_padded([prefix + response for prefix, response in requests])
        starts = np.arange(len(requests)) * input_ids.shape[1]
        predict_index = response_positions(starts, [len(p) for p, _ in requests], [len(r) for _, r in requests])
        targets = torch.tensor([t for _, response in requests for t in response])
        inputs = (input_ids, position_ids, attention_mask, predict_index, targets)
        logps = self.model(*(tensor.to(self.device) for tensor in inputs)).logps
        splits = np.cumsum([len(r) for _, r in requests])[:-1]
        return np.split(logps.cpu().numpy(), splits)


def _token_budget_batches(order: list[int], requests: list[ScoreRequest], budget: int):
    batch: list[int] = []
    for index in order:  # longest first, so the first member sets the padded width
        width = sum(map(len, requests[batch[0] if batch else index]))
        if batch and width * (len(batch) + 1) > budget:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch
