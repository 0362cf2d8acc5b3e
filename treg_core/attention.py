"""Attention over sequences packed back to back: no padding, and no [tokens, tokens] mask.

`varlen` is registered with transformers as an attention implementation. Each sequence of a pack starts at
position 0 (treg_core.forward), so the position ids alone say where sequences begin; the forward kernel turns
them into cumulative lengths once per forward and every layer reads them. On CUDA the work is done by
torch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`); elsewhere by causal sdpa
over each sequence in turn, which is exact and serves as the reference the CUDA kernel is checked against
before it is used (`cuda_varlen_problem`).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

VARLEN = "varlen"
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flex_attention", VARLEN)  # pack without a mask


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


def packed_lengths(position_ids: torch.Tensor) -> dict:
    """The keyword arguments `varlen_attention` reads, from one packed row's position ids."""
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    bounds = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, heads, tokens, dim], key/value [1, kv heads, tokens, dim]
    -> [1, tokens, heads, dim]. Without `cu_seq_lens_q` (rows not packed) each row is one causal sequence."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    kernel = cuda_kernel() if q.is_cuda else None
    if kernel is not None:
        out = kernel(q, k, v, bounds, kwargs["max_length_q"], scaling)
    else:
        out = sequence_by_sequence(q, k, v, bounds, scaling)
    return out[None], None


def sequence_by_sequence(q, k, v, bounds: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal sdpa on each sequence of the pack: the reference, and the path off CUDA."""
    cuts = bounds.tolist()
    parts = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True,
                                            scale=scale, enable_gqa=k.shape[1] != q.shape[1])[0].transpose(0, 1)
             for a, b in zip(cuts[:-1], cuts[1:])]
    return torch.cat(parts)


@functools.cache
def cuda_kernel():
    """torch's varlen flash attention, called the way this torch's signature wants; None where it is absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    def run(q, k, v, bounds, longest: int, scale: float | None):
        options = {}
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                options["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        if "is_causal" in params:
            options["is_causal"] = True
        else:
            options["window_size"] = (-1, 0)  # no limit to the left, none to the right: causal
        if scale is not None and "scale" in params:
            options["scale"] = scale
        return varlen_attn(q, k, v, bounds, bounds, longest, longest, **options)

    return run


def supported(config) -> bool:
    """Attention this module computes as the model would: no logit soft-capping, no sliding window."""
    text = config.get_text_config()
    return not getattr(text, "attn_logit_softcapping", None) and not (
        getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True))


def default_attention(config, device: torch.device, dtype: torch.dtype) -> tuple[str | None, str]:
    """(attention implementation, why): `varlen` where it computes what the model would (on CUDA once its kernel
    passed the check); otherwise None, the model's own. Packing saves the padding's compute everywhere: on a
    CPU too, where each sequence's causal sdpa in turn costs little beside the layers' matrix products."""
    if not supported(config):
        return None, "the model's own attention (it soft-caps its logits or slides a window)"
    if device.type != "cuda":
        return VARLEN, "varlen: causal sdpa over each packed sequence, no padding"
    problem = cuda_varlen_problem(dtype)
    if problem:
        return None, f"the model's own attention ({problem})"
    return VARLEN, "varlen: flash attention over packed sequences, no padding"


def cuda_varlen_problem(dtype: torch.dtype) -> str | None:
    """None when the CUDA kernel agrees with `sequence_by_sequence` on random packs in `dtype`, else why not."""
    kernel = cuda_kernel()
    if kernel is None or not torch.cuda.is_available():
        return "torch.nn.attention.varlen is not available"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"flash attention computes in bf16/fp16, not {dtype}"
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(300, heads, 64, device="cuda", dtype=dtype, generator=generator) for heads in (8, 2, 2))
    bounds = torch.tensor([0, 17, 160, 161, 300], device="cuda", dtype=torch.int32)
    try:
        got = kernel(q, k, v, bounds, 143, None).float()
    except Exception as err:  # noqa: BLE001 - any failure means: do not use it
        return f"varlen_attn failed: {type(err).__name__}: {err}"
    want = sequence_by_sequence(q, k, v, bounds, None).float()
    largest = float((got - want).abs().max())
    return None if largest <= 2e-2 else f"varlen_attn differs from sdpa by {largest:.3g}"
