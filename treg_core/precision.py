"""Which floating-point type a model runs in, named the same way in both stages.

`auto` means what transformers means by it: the dtype the checkpoint was saved in (its config's
`dtype`), float32 when the config names none. It is resolved before any engine starts, and only
the resolved name is ever recorded: vLLM's own `auto` would silently run an fp32 checkpoint in
bf16, and reference log-probs scored that way differ from an fp32 policy's by ~1e-3 per token.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """'float32' for torch.float32 or 'float32'; None for None."""
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype(model_config) -> str:
    """The dtype a checkpoint was saved in, from its transformers config (text part for multimodal)."""
    for config in (model_config.get_text_config(), model_config):
        name = dtype_name(getattr(config, "dtype", None))
        if name in DTYPES:
            return name
    return "float32"


def resolve_dtype(requested: str, model_config) -> str:
    return checkpoint_dtype(model_config) if requested == "auto" else requested
