"""Log-probabilities of chosen tokens from hidden states, without a [tokens, vocab] fp32 tensor
for the whole batch: the output projection and log-softmax run a chunk of rows at a time."""

from __future__ import annotations

import torch
import torch.utils.checkpoint


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


def selected_token_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    transform=lambda logits: logits,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """hidden [N, H] (the states that predict each target), targets [N] -> log π(target) [N], fp32.

    Under autograd each chunk is checkpointed: its logits are dropped after the forward and
    recomputed in the backward, so at most one [chunk_rows, vocab] fp32 block exists at a time.
    """

    def chunk_logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = transform(lm_head(h).float())
        return logits.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    chunks = []
    for start in range(0, targets.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and h.requires_grad:
            chunks.append(torch.utils.checkpoint.checkpoint(chunk_logps, h, t, use_reentrant=False))
        else:
            chunks.append(chunk_logps(h, t))
    return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
