"""The one forward kernel both stages use (the training policy and the transformers reference
scorer): token sequences in, the log-probability of each response token out.

- Layout: sequences are packed back to back (position ids restart per sequence) or right-padded
  (an attention mask marks them); either way the hidden state at flat position p predicts the
  token at p + 1, so a response after a prompt of P tokens is predicted from P - 1 on.
- Log-probs never come from a [tokens, vocab] fp32 tensor for the batch: the output projection
  and log-softmax run a chunk of rows at a time, and only at the response positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
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
    """Per selected position [N], fp32: log π(target); with `with_log_sum_sq` log Σ_v π(v)² (detached), WPO's
    normaliser; with a `reference`, KL(π_ref ‖ π) (TDPO's); with `with_hidden`, the states (OTPO's); None without."""

    logps: torch.Tensor
    log_sum_sq: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [N, H], detached: the final hidden states that predict each target


class ExactReference(NamedTuple):
    """The reference's whole distribution at the selected positions: its final hidden states [N, H] and its output
    layer's weight [V, H] (a plain tensor, so that a chunk recomputed in the backward can use it), with its logit
    transform. Each chunk computes the reference's logits beside the policy's: no [N, V] tensor exists."""

    hidden: torch.Tensor
    weight: torch.Tensor
    transform: Callable = lambda logits: logits

    def output_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.to(self.weight.dtype), self.weight)


class TopKReference(NamedTuple):
    """The reference's K most likely tokens at each selected position and their log-probs, [N, K] each (treg-score
    --ref-topk): the KL is taken over those K tokens and one bucket for the rest of the vocabulary, which is a lower
    bound on the whole KL (the log-sum inequality)."""

    ids: torch.Tensor
    logps: torch.Tensor


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 for the softmax, or in float64 where they are (the exactness tests run in it)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def reference_kl(logits: torch.Tensor, normaliser: torch.Tensor, reference: ExactReference | TopKReference,
                 chunk: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """KL(π_ref ‖ π) = Σ_v π_ref(v) (log π_ref(v) − log π(v)) per row of a chunk of the policy's `logits`, with the
    rows `chunk` of the reference's tensors."""
    log_policy = logits - normaliser[:, None]
    if isinstance(reference, ExactReference):
        (hidden,) = chunk
        ref_logits = reference.transform(at_least_fp32(reference.output_layer(hidden)))
        ref_logps = torch.log_softmax(ref_logits, dim=-1)
        return (ref_logps.exp() * (ref_logps - log_policy)).sum(-1)
    ids, ref_logps = chunk
    ref_logps = ref_logps.to(logits.dtype)
    ref_tail = (1 - ref_logps.exp().sum(-1)).clamp(min=0)  # π_ref of every token outside the K
    # log π of the same tokens; above -1e4 (a log-prob's floor), so that the rounding left of π_ref's tail where the K
    # tokens cover the vocabulary never meets log 0
    tail = (torch.logsumexp(logits.scatter(-1, ids, -torch.inf), dim=-1) - normaliser).clamp(min=-1e4)
    return (ref_logps.exp() * (ref_logps - log_policy.gather(-1, ids))).sum(-1) + torch.xlogy(
        ref_tail, ref_tail) - ref_tail * tail


def selected_token_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    transform=lambda logits: logits,
    chunk_rows: int = 1024,
    with_log_sum_sq: bool = False,
    reference: ExactReference | TopKReference | None = None,
) -> Logprobs:
    """hidden [N, H] (the states that predict each target), targets [N] -> Logprobs.

    log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z) for logits z, taken from the same chunk.
    Under autograd each chunk is checkpointed: its logits are dropped after the forward and
    recomputed in the backward, so at most one [chunk_rows, vocab] fp32 block exists at a time (two with an exact
    `reference`, whose logits are computed beside the policy's).
    """

    def chunk_logps(h: torch.Tensor, t: torch.Tensor, *reference_rows: torch.Tensor):
        logits = transform(at_least_fp32(lm_head(h)))
        normaliser = torch.logsumexp(logits, dim=-1)
        logps = logits.gather(-1, t[:, None]).squeeze(-1) - normaliser
        extra = ()
        if with_log_sum_sq:
            extra += (torch.logsumexp(2 * logits.detach(), dim=-1) - 2 * normaliser.detach(),)
        if reference is not None:
            extra += (reference_kl(logits, normaliser, reference, reference_rows),)
        return (logps, *extra)

    reference_tensors = () if reference is None else (
        (reference.hidden,) if isinstance(reference, ExactReference) else (reference.ids, reference.logps))
    chunks = []
    for start in range(0, targets.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t, r = hidden[rows], targets[rows], tuple(tensor[rows] for tensor in reference_tensors)
        if torch.is_grad_enabled() and h.requires_grad:
            chunks.append(torch.utils.checkpoint.checkpoint(chunk_logps, h, t, *r, use_reentrant=False))
        else:
            chunks.append(chunk_logps(h, t, *r))
    if not chunks:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return Logprobs(empty, empty if with_log_sum_sq else None, empty if reference is not None else None)
    parts = [torch.cat(part) for part in zip(*chunks)]
    return Logprobs(parts[0], parts[1] if with_log_sum_sq else None, parts[-1] if reference is not None else None)


class TokenLogprobs(nn.Module):
    """Wraps a causal LM: forward returns Logprobs at the selected positions. Everything touching the
    root's parameters happens inside this forward, as FSDP2 requires."""

    def __init__(self, lm: nn.Module, chunk_rows: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.transform = final_logit_transform(lm.config)

    def forward(self, input_ids, position_ids, predict_index, targets, with_log_sum_sq: bool = False,
                reference: ExactReference | TopKReference | None = None, hidden_only: bool = False,
                with_hidden: bool = False):
        """Rows packed (one row, positions restarting per sequence) or right-padded; no attention mask either way:
        the position ids mark a pack's sequences, and padding after a causal sequence is never attended to.
        With `hidden_only`, the final hidden states at the selected positions instead ([N, H]: a reference's, for
        `exact_reference`)."""
        lengths = {}
        if self.lm.config._attn_implementation == VARLEN and input_ids.shape[0] == 1:
            lengths = packed_lengths(position_ids)  # where the sequences of the pack begin, for every layer
        hidden = self.lm.base_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False, **lengths
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[predict_index]
        if hidden_only:
            return hidden
        out = selected_token_logprobs(hidden, self.lm.get_output_embeddings(), targets, self.transform,
                                      self.chunk_rows, with_log_sum_sq, reference)
        return out._replace(hidden=hidden.detach()) if with_hidden else out

    def exact_reference(self, hidden: torch.Tensor) -> ExactReference:
        """This model as the reference whose whole distribution another model's KL reads, from its `hidden_only`
        states; its output layer must be a plain tensor (treg_train.model.load_sharded's whole_output_layer)."""
        head = self.lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("the reference's output layer has a bias, which the exact KL leaves out")
        return ExactReference(hidden, head.weight, self.transform)


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
