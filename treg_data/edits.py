"""Where two answers differ, token by token (docs/METHOD.md, "Edited tokens").

The edited tokens of an answer are its response token ids outside the longest common prefix and the longest
common suffix of the two answers' ids, as treg-score stores them. treg-probe uses them as the labels a token
reward should find; `treg-score --token-rewards edit-diff` turns them into the rewards themselves.
"""

from __future__ import annotations

import numpy as np

EDIT_REWARD = 0.5  # |r| of an edited token under edit-diff: the edge of the rewards column's range
EDIT_DIFF_TRANSFORM = f"edit-diff: +{EDIT_REWARD} on chosen's edited tokens, -{EDIT_REWARD} on rejected's, 0 elsewhere"


def common_ends(a: list[int], b: list[int]) -> tuple[int, int]:
    """The lengths of the longest common prefix and of the longest common suffix that does not overlap it."""
    limit = min(len(a), len(b))
    prefix = 0
    while prefix < limit and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return prefix, suffix


def edited_mask(ids: list[int], other: list[int]) -> np.ndarray:
    """True at each token of `ids` that is edited with respect to `other`."""
    prefix, suffix = common_ends(ids, other)
    mask = np.zeros(len(ids), dtype=bool)
    mask[prefix:len(ids) - suffix] = True
    return mask


def edit_diff_rewards(chosen_ids: list[int], rejected_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """+EDIT_REWARD on chosen's edited tokens, -EDIT_REWARD on rejected's, 0 on every other token."""
    chosen = np.where(edited_mask(chosen_ids, rejected_ids), EDIT_REWARD, 0.0).astype(np.float32)
    rejected = np.where(edited_mask(rejected_ids, chosen_ids), -EDIT_REWARD, 0.0).astype(np.float32)
    return chosen, rejected


def not_near_edit(chosen_ids: list[int], rejected_ids: list[int], max_edit_tokens: int) -> str | None:
    """Why the pair is not a near edit, or None when it is: the longer of the two edited spans is at most
    `max_edit_tokens` tokens and at most half of its answer, so most of each answer is shared context."""
    for name, ids, other in (("chosen", chosen_ids, rejected_ids), ("rejected", rejected_ids, chosen_ids)):
        span = int(edited_mask(ids, other).sum())
        if span > max_edit_tokens:
            return f"{name}'s edited span is {span} tokens > --max-edit-tokens {max_edit_tokens}"
        if 2 * span > len(ids):
            return f"{name}'s edited span is {span} of its {len(ids)} tokens: more than half of the answer"
    return None
