"""Reference scorer: a plain transformers forward with the same interface as the vLLM scorer,
through the kernel the training policy uses (treg_core.forward). Sequences are sorted by length
and batched to a token budget: packed back to back without padding where the attention runs
variable-length (treg_core.attention's varlen, the default where the model allows it), else
right-padded. Only the response rows go through the output projection. The top-K tokens (`score_topk`) come
from the same model and layout: its base model to the hidden states at the response positions, then the output
layer and log-softmax a chunk of rows at a time, so no [tokens, vocabulary] tensor exists for the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from treg_core.attention import VARLEN, VARLEN_IMPLEMENTATIONS, default_attention, register
from treg_core.forward import TokenLogprobs, at_least_fp32, packed, response_positions, right_padded
from treg_core.precision import DTYPES
from treg_data.scorers.base import EngineOptions, ScoreRequest, TopK, sorted_topk

# Response rows per output-layer call outside the kernel (score_topk, the contrastive estimate): one
# [rows, vocabulary] fp32 block at a time.
OUTPUT_CHUNK_ROWS = 1024


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
        for batch in self.batches(requests):
            for index, logps in zip(batch, self._score_batch([requests[i] for i in batch]), strict=True):
                results[index] = logps
        return results

    @torch.inference_mode()
    def score_topk(self, requests: list[ScoreRequest], k: int) -> list[TopK]:
        """Per request, the K most likely tokens at each response position and their log-probs (base.TopK)."""
        results: list[TopK | None] = [None] * len(requests)
        for batch in self.batches(requests):
            for index, top in zip(batch, self._topk_batch([requests[i] for i in batch], k), strict=True):
                results[index] = top
        return results

    def batches(self, requests: list[ScoreRequest]):
        """The indices of `requests`, longest first, in runs of one forward each (the token budget)."""
        order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
        return _token_budget_batches(order, requests, self.batch_tokens, self.packed)

    def response_hidden(self, requests: list[ScoreRequest]) -> torch.Tensor:
        """The final hidden states [response tokens, H] that predict each response token of one batch of `requests`,
        in their order: the forward TokenLogprobs runs, up to the output layer."""
        input_ids, position_ids, predict_index = (t.to(self.device) for t in self._layout(requests))
        return self.model(input_ids, position_ids, predict_index, None, hidden_only=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on some rows of `response_hidden`, after the architecture's logit transform, in fp32 (or
        float64 where the model runs in it): [rows, vocabulary]."""
        return self.model.transform(at_least_fp32(self.model.lm.get_output_embeddings()(hidden)))

    def _layout(self, requests: list[ScoreRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, position_ids and the flat positions that predict each response token, packed or padded."""
        sequences = [np.asarray(prefix + response) for prefix, response in requests]
        if self.packed:
            input_ids, position_ids = packed(sequences)
            starts = np.concatenate([[0], np.cumsum([len(s) for s in sequences])[:-1]])
        else:
            input_ids, position_ids = right_padded(sequences)
            starts = np.arange(len(requests)) * input_ids.shape[1]
        predict_index = response_positions(starts, [len(p) for p, _ in requests], [len(r) for _, r in requests])
        return input_ids, position_ids, predict_index

    def _score_batch(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        targets = torch.tensor([t for _, response in requests for t in response])
        inputs = (*self._layout(requests), targets)
        logps = self.model(*(tensor.to(self.device) for tensor in inputs)).logps
        splits = np.cumsum([len(r) for _, r in requests])[:-1]
        return np.split(logps.float().cpu().numpy(), splits)

    def _topk_batch(self, requests: list[ScoreRequest], k: int) -> list[TopK]:
        """The forward TokenLogprobs runs (base model, the response rows' hidden states, the output layer after the
        architecture's logit transform, fp32 log-softmax), keeping each row's top K instead of one target's."""
        hidden = self.response_hidden(requests)
        ids, logps = [], []
        for start in range(0, hidden.shape[0], OUTPUT_CHUNK_ROWS):
            logits = self.logits(hidden[start:start + OUTPUT_CHUNK_ROWS])
            top = torch.topk(logits - torch.logsumexp(logits, dim=-1, keepdim=True), k, dim=-1)
            ids.append(top.indices.cpu())
            logps.append(top.values.cpu())
        ids_all, logps_all = sorted_topk(torch.cat(ids).numpy(), torch.cat(logps).numpy())
        splits = np.cumsum([len(r) for _, r in requests])[:-1]
        return list(zip(np.split(ids_all, splits), np.split(logps_all, splits), strict=True))


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
