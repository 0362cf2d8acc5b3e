"""Reference scorer: a plain transformers forward with the same interface as the vLLM scorer,
through the kernel the training policy uses (treg_core.forward). Sequences are sorted by length
and batched to a token budget: packed back to back without padding where the attention runs
variable-length (treg_core.attention's varlen, the default where the model allows it), else
right-padded. Only the response rows go through the output projection.
"""

from __future__ import annotations

import numpy as np
import torch

from treg_core.attention import VARLEN, VARLEN_IMPLEMENTATIONS, default_attention, register
from treg_core.forward import TokenLogprobs, packed, response_positions, right_padded
from treg_core.precision import DTYPES
from treg_data.scorers.base import EngineOptions, ScoreRequest


class HFScorer:
    def __init__(self, options: EngineOptions):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES.get(options.dtype, torch.float32)
        config = AutoConfig.from_pretrained(options.model, revision=options.revision)
        attention, _ = default_attention(config, self.device, dtype)
        if attention == VARLEN:
            register()
        model = AutoModelForCausalLM.from_pretrained(options.model, revision=options.revision, dtype=dtype,
                                                     **({"attn_implementation": attention} if attention else {}))
        self.model = TokenLogprobs(model).to(self.device).eval()
        self.packed = attention in VARLEN_IMPLEMENTATIONS
        self.scoring_path = "transformers_forward" + (", packed" if self.packed else "")
        self.batch_tokens = options.batch_tokens

    def close(self) -> None:
        pass

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
        for batch in _token_budget_batches(order, requests, self.batch_tokens, self.packed):
            for index, logps in zip(batch, self._score_batch([requests[i] for i in batch]), strict=True):
                results[index] = logps
        return results

    def _score_batch(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        sequences = [np.asarray(prefix + response) for prefix, response in requests]
        if self.packed:
            input_ids, position_ids = packed(sequences)
            starts = np.concatenate([[0], np.cumsum([len(s) for s in sequences])[:-1]])
        else:
            input_ids, position_ids = right_padded(sequences)
            starts = np.arange(len(requests)) * input_ids.shape[1]
        predict_index = response_positions(starts, [len(p) for p, _ in requests], [len(r) for _, r in requests])
        targets = torch.tensor([t for _, response in requests for t in response])
        inputs = (input_ids, position_ids, predict_index, targets)
        logps = self.model(*(tensor.to(self.device) for tensor in inputs)).logps
        splits = np.cumsum([len(r) for _, r in requests])[:-1]
        return np.split(logps.float().cpu().numpy(), splits)


def _token_budget_batches(order: list[int], requests: list[ScoreRequest], budget: int, packed: bool):
    """Consecutive runs of `order` (longest first) within `budget` tokens: their sum when packed, else the
    first one's length (the padded width) times their number."""
    batch: list[int] = []
    used = 0
    for index in order:
        length = sum(map(len, requests[index]))
        cost = used + length if packed else sum(map(len, requests[batch[0] if batch else index])) * (len(batch) + 1)
        if batch and cost > budget:
            yield batch
            batch, cost = [], length
        batch.append(index)
        used = cost
    if batch:
        yield batch
