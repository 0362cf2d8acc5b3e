"""One scorer call for a chunk of encoded pairs, and the shard rows it becomes (treg_data.contract):
six sequences per pair (each response after the policy prompt, x_better and x_worse), then
r̂ per response token from the two revision contexts (treg_data.rewards)."""

from __future__ import annotations

from treg_data.contract import SIDES, column
from treg_data.encoding import CONTEXTS, EncodedPair
from treg_data.rewards import contrastive_rewards
from treg_data.scorers import Scorer


def score_pairs(scorer: Scorer, pairs: list[EncodedPair]) -> list[dict]:
    """One scorer call for all six sequences of every pair, then one shard row per pair."""
    requests = [(resp.prefixes[ctx], resp.ids) for p in pairs for resp in (p.chosen, p.rejected) for ctx in CONTEXTS]
    logps = iter(scorer.score(requests))
    rows = []
    for p in pairs:
        row = {"id": p.pair.id, "prompt": p.pair.prompt, "chosen": [p.pair.chosen], "rejected": [p.pair.rejected],
               "prompt_ids": p.prompt_ids}
        for side, resp in zip(SIDES, (p.chosen, p.rejected)):
            by_context = {ctx: next(logps) for ctx in CONTEXTS}
            row[column(side, "ids")] = resp.ids
            for ctx in CONTEXTS:
                row[column(side, f"{ctx}_logps")] = by_context[ctx]
            row[column(side, "rewards")] = contrastive_rewards(by_context["better"], by_context["worse"])
        rows.append(row)
    return rows
