"""Log-probabilities of chosen tokens from hidden states, without a [tokens, vocab] fp32 tensor
for the whole batch: the output projection and log-softmax run a chunk of rows at a time."""

from __future__ import annotations

import torch


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
    """hidden [N, H] (the states that predict each target), targets [N] -> log π(target) [N], fp32."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], chunk_rows):
        stop = start + chunk_rows
        logits = transform(lm_head(hidden[start:stop]).float())
        picked = logits.gather(-1, targets[start:stop, None]).squeeze(-1)
        out[start:stop] = picked - torch.logsumexp(logits, dim=-1)
    return out
