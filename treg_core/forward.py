"""The one forward kernel both stages use (the training policy and the transformers reference
scorer): token sequences in, the log-probability of each response token out.

- Layout: sequences are packed back to back (position ids restart per sequence) or right-padded
  (an attention mask marks them); either way the hidden state at flat position p predicts the
  token at p + 1, so a response after a prompt of P tokens is predicted from P - 1 on.
- Log-probs never come from a [tokens, vocab] fp32 tensor for the batch: the output projection
  and log-softmax run a chunk of rows at a time, and only at the response positions.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from treg_core.attention import VARLEN, packed_lengths


def final_logit_transform(config):
    """The logit post-processing some architectures apply in their own forward."""
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
    scale = getattr(config, "logit_scale", None)  # Cohere
    divide = getattr(config, "logits_scaling", None)  # Granite

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


class Logprobs(NamedTuple):
    """Per selected position [N], fp32: log π(target), and with `with_log_sum_sq` log Σ_v π(v)² (detached),
    WPO's normaliser; None without."""

    logps: torch.Tensor
    log_sum_sq: torch.Tensor | None = None


def selected_token_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    transform=lambda logits: logits,
    chunk_rows: int = 1024,
    with_log_sum_sq: bool = False,
) -> Logprobs:
    """hidden [N, H] (the states that predict each target), targets [N] -> Logprobs.

    log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z) for logits z, taken from the same chunk.
    Under autograd each chunk is checkpointed: its logits are dropped after the forward and
    recomputed in the backward, so at most one [chunk_rows, vocab] fp32 block exists at a time.
    """

    def chunk_logps(h: torch.Tensor, t: torch.Tensor):
        logits = transform(lm_head(h).float())
        normaliser = torch.logsumexp(logits, dim=-1)
        logps = logits.gather(-1, t[:, None]).squeeze(-1) - normaliser
        if not with_log_sum_sq:
            return (logps,)
        return logps, (torch.logsumexp(2 * logits.detach(), dim=-1) - 2 * normaliser.detach())

    chunks = []
    for start in range(0, targets.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and h.requires_grad:
            chunks.append(torch.utils.checkpoint.checkpoint(chunk_logps, h, t, use_reentrant=False))
        else:
            chunks.append(chunk_logps(h, t))
    if not chunks:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return Logprobs(empty, empty if with_log_sum_sq else None)
    return Logprobs(*(torch.cat(parts) for parts in zip(*chunks)))


class TokenLogprobs(nn.Module):
    """Wraps a causal LM: forward returns Logprobs at the selected positions. Everything touching the
    root's parameters happens inside this forward, as FSDP2 requires."""

    def __init__(self, lm: nn.Module, chunk_rows: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.transform = final_logit_transform(lm.config)

    def forward(self, input_ids, position_ids, predict_index, targets, with_log_sum_sq: bool = False) -> Logprobs:
        """Rows packed (one row, positions restarting per sequence) or right-padded; no attention mask either way:
        the position ids mark a pack's sequences, and padding after a causal sequence is never attended to."""
        lengths = {}
        if self.lm.config._attn_implementation == VARLEN and input_ids.shape[0] == 1:
            lengths = packed_lengths(position_ids)  # where the sequences of the pack begin, for every layer
        hidden = self.lm.base_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False, **lengths
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[predict_index]
        return selected_token_logprobs(hidden, self.lm.get_output_embeddings(), targets, self.transform,
                                       self.chunk_rows, with_log_sum_sq)


def right_padded(sequences: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and position_ids [rows, longest] for right-padded sequences. No attention mask is needed: in
    causal attention a real token never attends to the padding after it, and without a mask sdpa runs its
    causal kernel instead of materialising a [rows, longest, longest] mask."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(np.asarray(sequence, dtype=np.int64))
    return input_ids, torch.arange(width).expand(len(sequences), width)


def packed(sequences: list[np.ndarray], pack_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and position_ids [1, total] for sequences back to back, positions restarting at 0 for each.
    With `pack_to`, a filler sequence (token 0) makes the row that long: one of a few lengths, so a kernel
    compiled per shape compiles a bounded number of times; no position predicts from it."""
    lengths = [len(sequence) for sequence in sequences]
    if pack_to and pack_to > sum(lengths):
        sequences, lengths = [*sequences, np.zeros(pack_to - sum(lengths), dtype=np.int64)], [*lengths,
                                                                                                pack_to - sum(lengths)]
    input_ids = torch.from_numpy(np.concatenate(sequences).astype(np.int64))[None]
    return input_ids, torch.cat([torch.arange(n) for n in lengths])[None]


def response_positions(starts, prompt_lengths, response_lengths) -> torch.Tensor:
    """Flat positions whose hidden state predicts each response token (position p predicts p + 1),
    for sequences starting at `starts` in the flattened batch."""
    return torch.from_numpy(np.concatenate([
        np.arange(start + prompt - 1, start + prompt + response - 1, dtype=np.int64)
        for start, prompt, response in zip(starts, prompt_lengths, response_lengths)
    ]))
