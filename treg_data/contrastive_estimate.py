"""cDPO's contrastive estimate (treg-score --ce-scores; "Critical Tokens Matter", `Pipeline.calculate_ce_score` of
its code): for each response token y_t after the policy prompt,

    log p_ce(y_t) = log softmax_v(2·log π_pos(v) − log π_neg(v))[y_t]

with π_pos the positive model (--dpo-model) and π_neg the negative one (--reverse-dpo-model) at the position that
predicts y_t (2·z_pos − z_neg of their logits: each model's own normaliser is constant over v and cancels). The
normaliser needs both models' whole distributions at every position, which vLLM's prompt log-probs do not give, so
both run in transformers (treg_data.scorers.hf_scorer) whatever the backend: the same layout and token-budget batches
as the transformers scorer, the output layers and the softmax in fp32 a chunk of rows at a time, so no
[tokens, vocabulary] tensor exists for the batch."""

from __future__ import annotations

import numpy as np
import torch

from treg_core.contract import LOGPROB_RANGE
from treg_core.errors import UserError
from treg_data.scorers.base import EngineOptions, ScoreRequest
from treg_data.scorers.hf_scorer import OUTPUT_CHUNK_ROWS, HFScorer


class ContrastiveEstimate:
    """The scorer of `*_ce_logps`: `score` gives log p_ce of every response token of each request. A model given as
    an HFScorer is used as it is (--backend hf has them loaded already); given as EngineOptions it is loaded, in
    the options' dtype on the scoring device."""

    def __init__(self, positive: HFScorer | EngineOptions, negative: HFScorer | EngineOptions):
        self.positive, self.negative = (m if isinstance(m, HFScorer) else HFScorer(m) for m in (positive, negative))
        widths = [m.model.lm.get_output_embeddings().weight.shape[0] for m in (self.positive, self.negative)]
        if widths[0] != widths[1]:
            raise UserError(f"--dpo-model and --reverse-dpo-model have output layers of {widths[0]} and {widths[1]} "
                            "tokens, but --ce-scores compares their distributions token by token: give two models "
                            "with --model's vocabulary")
        # batches within the budget of the padded layout where either model pads (it costs the most)
        self.planner = self.negative if self.positive.packed else self.positive
        self.scoring_path = f"transformers_forward, contrastive estimate ({self.positive.scoring_path})"

    def close(self) -> None:
        for model in (self.positive, self.negative):
            model.close()

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[np.ndarray]:
        """Per request, log p_ce of each response token, float32 in the log-prob range [-1e4, 0]."""
        results: list[np.ndarray | None] = [None] * len(requests)
        for batch in self.planner.batches(requests):
            chosen = [requests[i] for i in batch]
            positive, negative = self.positive.response_hidden(chosen), self.negative.response_hidden(chosen)
            targets = torch.tensor([t for _, response in chosen for t in response], device=positive.device)
            chunks = [slice(start, start + OUTPUT_CHUNK_ROWS) for start in range(0, len(targets), OUTPUT_CHUNK_ROWS)]
            values = torch.cat([contrastive_logps(self.positive.logits(positive[rows]),
                                                  self.negative.logits(negative[rows]), targets[rows])
                                for rows in chunks])
            if torch.isnan(values).any():
                raise RuntimeError("the contrastive estimate is NaN at some response token: both models' logits "
                                   "are -inf or NaN there")
            values = values.clamp(min=LOGPROB_RANGE[0], max=0.0).float().cpu().numpy()  # rounding above 0: 0
            splits = np.cumsum([len(response) for _, response in chosen])[:-1]
            for index, logps in zip(batch, np.split(values, splits), strict=True):
                results[index] = logps
        return results


def contrastive_logps(positive_logits: torch.Tensor, negative_logits: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """log softmax_v(2·log_softmax(z_pos) − log_softmax(z_neg))[target] of each row: logits [rows, vocabulary] (fp32
    or float64), targets [rows]."""
    scores = torch.log_softmax(positive_logits, dim=-1).mul_(2).sub_(torch.log_softmax(negative_logits, dim=-1))
    return scores.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(scores, dim=-1)
