"""Reference scorer: a plain transformers forward with the same interface as the vLLM scorer.

Sequences are sorted by length and batched to a token budget (right padding, so the default
positions are right); only the response rows go through the output projection.
"""

from __future__ import annotations

import numpy as np
import torch

from treg_data.precision import DTYPES
from treg_data.scorers import EngineOptions, ScoreRequest
from treg_data.token_logprobs import final_logit_transform, selected_token_logprobs


class HFScorer:
    path = "transformers_forward"

    def __init__(self, options: EngineOptions):
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES.get(options.dtype, "auto")
        model = AutoModelForCausalLM.from_pretrained(options.model, revision=options.revision, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.transform = final_logit_transform(model.config)
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
        sequences = [prefix + response for prefix, response in requests]
        width = max(map(len, sequences))
        input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        hidden = self.model.base_model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).last_hidden_state
        # Position p predicts token p + 1: the response starting at P is predicted from P - 1 on.
        rows = torch.cat([torch.arange(len(p) - 1, len(p) + len(r) - 1) + i * width for i, (p, r) in enumerate(requests)])
        targets = torch.tensor([t for _, response in requests for t in response], device=self.device)
        logps = selected_token_logprobs(
            hidden.reshape(-1, hidden.shape[-1])[rows.to(self.device)],
            self.model.get_output_embeddings(),
            targets,
            self.transform,
        )
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
