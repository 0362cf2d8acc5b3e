"""A rank's pairs as forwards: cut into micro-batches of a token budget (`micro_batches`), and each
micro-batch turned into model inputs, [chosen; rejected] in one forward, packed without padding
(position ids restart per sequence) or right-padded (`collate`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from treg_core.forward import packed, response_positions, right_padded
from treg_train.index import TrainingPair


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    predict_index: torch.Tensor  # [N] flat positions whose hidden state predicts a response token
    targets: torch.Tensor  # [N] the response tokens
    token_mask: torch.Tensor  # [2 * pairs, longest response]: where the N tokens go, row-major
    ref_logps: torch.Tensor | None  # [2 * pairs, longest response]
    rewards: torch.Tensor  # [2 * pairs, longest response]
    signal: torch.Tensor | None  # [2 * pairs, longest response]: a token weighting's s_t, if it reads one
    num_pairs: int
    num_tokens: int  # real tokens in the forward
    ref_topk_ids: torch.Tensor | None = None  # [N, K]: the reference's K likeliest tokens at each response position
    ref_topk_logps: torch.Tensor | None = None  # [N, K]: their log-probs (TDPO's KL from the shards)
    prompt_lengths: torch.Tensor | None = None  # [2 * pairs]: tokens of each row's prompt

    def to(self, device: torch.device) -> ModelInputs:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return ModelInputs(**moved)


def micro_batches(pairs: list[TrainingPair], max_tokens: int, padding_free: bool) -> list[list[TrainingPair]]:
    """Split pairs into forwards of at most max_tokens tokens ([chosen; rejected] together).
    Longest first; with padding every pair costs the longest sequence in its micro-batch."""
    batches: list[list[TrainingPair]] = []
    current: list[TrainingPair] = []
    for pair in sorted(pairs, key=lambda p: -p.longest):
        candidate = current + [pair]
        if padding_free:
            cost = sum(p.num_tokens for p in candidate)
        else:
            cost = 2 * len(candidate) * candidate[0].longest  # the first is the longest
        if current and cost > max_tokens:
            batches.append(current)
            candidate = [pair]
        current = candidate
    if current:
        batches.append(current)
    return batches


def collate(pairs: list[TrainingPair], padding_free: bool, pack_to: int | None = None) -> ModelInputs:
    """With `padding_free`, one packed row (`pack_to` long, with `pack_to`); else right-padded rows."""
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    prompts = [p.prompt_ids for p in pairs] * 2
    lengths = [len(prompt) + len(response) for prompt, response in zip(prompts, responses)]
    sequences = [np.concatenate([prompt, response]) for prompt, response in zip(prompts, responses)]
    if padding_free:
        input_ids, position_ids = packed(sequences, pack_to)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    else:
        input_ids, position_ids = right_padded(sequences)
        starts = np.arange(len(sequences)) * input_ids.shape[1]
    predict_index = response_positions(starts, map(len, prompts), map(len, responses))
    targets = torch.from_numpy(np.concatenate(responses).astype(np.int64))

    longest = max(len(response) for response in responses)
    token_mask = torch.arange(longest)[None] < torch.tensor([len(r) for r in responses])[:, None]

    def padded(values: list | None) -> torch.Tensor | None:
        if values is None or any(v is None for v in values):
            return None
        out = torch.zeros(len(sequences), longest, dtype=torch.float32)
        out[token_mask] = torch.from_numpy(np.concatenate(values).astype(np.float32))
        return out

    return ModelInputs(
        input_ids=input_ids, position_ids=position_ids,
        predict_index=predict_index, targets=targets, token_mask=token_mask,
        ref_logps=padded([p.chosen_ref_logps for p in pairs] + [p.rejected_ref_logps for p in pairs]),
        rewards=padded([p.chosen_rewards for p in pairs] + [p.rejected_rewards for p in pairs]),
        signal=padded([p.chosen_signal for p in pairs] + [p.rejected_signal for p in pairs]),
        num_pairs=len(pairs), num_tokens=sum(lengths), prompt_lengths=torch.tensor([len(p) for p in prompts]),
        ref_topk_ids=flat([p.chosen_ref_topk_ids for p in pairs] + [p.rejected_ref_topk_ids for p in pairs],
                          torch.long),
        ref_topk_logps=flat([p.chosen_ref_topk_logps for p in pairs] + [p.rejected_ref_topk_logps for p in pairs],
                            torch.float32),
    )


def flat(values: list, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-token rows [tokens, K] of every response, in the order of the targets; None where the pairs lack them."""
    if any(v is None for v in values):
        return None
    return torch.from_numpy(np.concatenate(values)).to(dtype)


def scatter_tokens(flat: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values [N] (or [N, H]) -> [rows, longest response] (or [..., H]), zero off the mask
    (autograd-safe)."""
    mask = token_mask.reshape(token_mask.shape + (1,) * (flat.dim() - 1))
    return flat.new_zeros(token_mask.shape + flat.shape[1:]).masked_scatter(mask, flat)
