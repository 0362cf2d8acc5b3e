"""One scorer call for a chunk of encoded pairs, and the shard rows it becomes (treg_core.contract):
six sequences per pair (each response after the policy prompt, x_better and x_worse), then
r̂ per response token from the two revision contexts (treg_data.rewards). With a DPO scorer, its
call on the two policy-prompt sequences of every pair gives `*_dpo_rewards` against `*_ref_logps`."""

from __future__ import annotations

from treg_core.contract import CONTEXTS, SIDES, column
from treg_data.encoding import EncodedPair
from treg_data.rewards import contrastive_rewards
from treg_data.scorers import Scorer

PER_PAIR = len(SIDES) * len(CONTEXTS)  # sequences scored per pair: EncodedPair.requests()


def score_pairs(scorer: Scorer, pairs: list[EncodedPair], dpo_scorer: Scorer | None = None) -> list[dict]:
    """One scorer call for all six sequences of every pair (and one DPO-scorer call for the two
    policy-prompt ones), then one shard row per pair."""
    logps = _score(scorer, [request for p in pairs for request in p.requests()])
    dpo_logps = _score(dpo_scorer, [r for p in pairs for r in p.requests(("ref",))]) if dpo_scorer else None
    rows = []
    for n, p in enumerate(pairs):
        row = {"id": p.pair.id, "prompt": p.pair.prompt, "chosen": [p.pair.chosen], "rejected": [p.pair.rejected],
               "prompt_ids": p.prompt_ids}
        for s, (side, response) in enumerate(zip(SIDES, (p.chosen, p.rejected))):
            first = n * PER_PAIR + s * len(CONTEXTS)  # requests() order: side, then context
            by_context = dict(zip(CONTEXTS, logps[first:first + len(CONTEXTS)], strict=True))
            row[column(side, "ids")] = response.ids
            for context, values in by_context.items():
                row[column(side, f"{context}_logps")] = values
            row[column(side, "rewards")] = contrastive_rewards(by_context["better"], by_context["worse"])
            if dpo_logps is not None:  # σ(log π_dpo − log π_ref) − 0.5: the same transform (METHOD.md §3)
                row[column(side, "dpo_rewards")] = contrastive_rewards(dpo_logps[n * len(SIDES) + s], by_context["ref"])
        rows.append(row)
    return rows


def _score(scorer: Scorer, requests: list) -> list:
    results = scorer.score(requests)
    if len(results) != len(requests):  # results are matched to requests by index
        raise RuntimeError(f"the scorer returned {len(results)} results for {len(requests)} sequences")
    return results
