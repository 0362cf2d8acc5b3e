"""One scorer call for a chunk of encoded pairs, and the shard rows it becomes (treg_data.contract):
six sequences per pair (each response after the policy prompt, x_better and x_worse), then
r̂ per response token from the two revision contexts (treg_data.rewards). With a DPO scorer, its
call on the two policy-prompt sequences of every pair gives `*_dpo_rewards` against `*_ref_logps`."""

from __future__ import annotations

from treg_data.contract import SIDES, column
from treg_data.encoding import CONTEXTS, EncodedPair
from treg_data.rewards import contrastive_rewards
from treg_data.scorers import Scorer


def score_pairs(scorer: Scorer, pairs: list[EncodedPair], dpo_scorer: Scorer | None = None) -> list[dict]:
    """One scorer call for all six sequences of every pair (and one DPO-scorer call for the two
    policy-prompt ones), then one shard row per pair."""
    requests = [(resp.prefixes[ctx], resp.ids) for p in pairs for resp in (p.chosen, p.rejected) for ctx in CONTEXTS]
    logps = iter(scorer.score(requests))
    dpo_logps = None
    if dpo_scorer is not None:
        dpo_logps = iter(dpo_scorer.score([(resp.prefixes["ref"], resp.ids) for p in pairs
                                           for resp in (p.chosen, p.rejected)]))
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
            if dpo_logps is not None:  # σ(log π_dpo − log π_ref) − 0.5: the same transform (METHOD.md §3)
                row[column(side, "dpo_rewards")] = contrastive_rewards(next(dpo_logps), by_context["ref"])
        rows.append(row)
    return rows
