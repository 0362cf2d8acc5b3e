"""The length policy of treg-score, and the one place `max_model_len` is decided.

Nothing is ever truncated: a pair whose sequences do not all fit these limits is skipped with a
reason (treg_data.encoding applies them).
"""

from __future__ import annotations

from dataclasses import dataclass

from treg_core.errors import UserError


@dataclass(frozen=True)
class LengthLimits:
    """`max_length` bounds prompt + response (the training sequence); `max_prompt_length` the
    prompt; `max_model_len` every revision sequence (revision prompt quoting the response, then
    the response), which is why it defaults to about twice `max_length`."""

    max_length: int
    max_prompt_length: int
    max_model_len: int


def resolve_max_model_len(requested: int | None, context: int | None, max_length: int,
                          revision_prompt_tokens: int) -> int:
    """`--max-model-len` if given (never beyond the model's context), else room for a revision
    sequence of a max-length pair: it quotes the response and then holds it, so about twice
    max_length plus the revision prompt; capped at the model's context."""
    if requested:
        if context and requested > context:
            raise UserError(f"--max-model-len {requested} is beyond the model's context of {context} tokens")
        return requested
    wanted = 2 * max_length + revision_prompt_tokens
    return min(wanted, context) if context else wanted
