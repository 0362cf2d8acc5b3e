"""The policy as a module that returns log-probs of the response tokens only, and its FSDP2
sharding (fully_shard per decoder layer, then the root)."""

from __future__ import annotations

import torch
from torch import nn

from treg_data.token_logprobs import final_logit_transform, selected_token_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenLogprobs(nn.Module):
    """Wraps a causal LM: forward returns log π(target) for the selected positions, never a
    [tokens, vocab] fp32 tensor for the batch (the output projection runs in checkpointed chunks).
    Everything touching the root's parameters happens inside this forward, as FSDP2 requires."""

    def __init__(self, lm: nn.Module, chunk_rows: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.transform = final_logit_transform(lm.config)

    def forward(self, input_ids, position_ids, attention_mask, predict_index, targets) -> torch.Tensor:
        hidden = self.lm.base_model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[predict_index]
        return selected_token_logprobs(hidden, self.lm.get_output_embeddings(), targets, self.transform, self.chunk_rows)


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def packs_without_padding(lm: nn.Module, requested: bool | None) -> bool:
    """Packing pays where attention is variable-length; with a mask it costs [tokens, tokens]."""
    if requested is not None:
        return requested
    return getattr(lm.config, "_attn_implementation", None) in VARLEN_ATTENTION


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks, found by the class names transformers lists as not-to-be-split."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")
    return layers


def shard_model(model: TokenLogprobs, mesh, param_dtype: torch.dtype | None, trainable: bool = True) -> TokenLogprobs:
    """FSDP2: each decoder layer is a unit, the root holds embeddings, final norm and lm_head.
    Mixed precision computes in `param_dtype` and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(model.lm):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model
