"""One scorer call for a chunk of encoded pairs, and the shard rows it becomes (treg_core.contract):
six sequences per pair (each response after the policy prompt, x_better and x_worse), then r̂ per response
token from the two revision contexts (treg_data.rewards); without revision prompts (--token-rewards edit-diff),
the policy prompt's two and the rewards of the answers' edit (treg_data.edits). Each other model (treg-score
--dpo-model, --reverse-dpo-model) scores the two policy-prompt sequences of every pair in one call of its own
scorer: `*_{name}_logps`, and for the DPO model also `*_dpo_rewards` against `*_ref_logps`. With --ref-topk K the
main scorer also gives the K most likely tokens at each response position of those two sequences:
`*_ref_topk_ids` and `*_ref_topk_logps`, one list of K per response token. With --ce-scores the contrastive
estimate (treg_data.contrastive_estimate) scores those two sequences too: `*_ce_logps`."""

from __future__ import annotations

import numpy as np

from treg_core.contract import LOGPROB_RANGE, SIDES, column
from treg_data.edits import edit_diff_rewards
from treg_data.encoding import EncodedPair
from treg_data.rewards import contrastive_rewards
from treg_data.scorers import Scorer, TopK


def score_pairs(scorer: Scorer, pairs: list[EncodedPair], others: dict[str, Scorer] | None = None,
                topk: int = 0, ce: Scorer | None = None) -> list[dict]:
    """One scorer call for all six sequences of every pair (and one call of each other model's scorer,
    by column name, for the two policy-prompt ones; with `topk` one more of the main scorer, for their top-K
    tokens; with `ce`, a ContrastiveEstimate, one of it for their `*_ce_logps`), then one shard row per pair."""
    contexts = pairs[0].contexts  # one encoder, so the same for every pair
    logps = _score(scorer, [request for p in pairs for request in p.requests(contexts)])
    policy_prompt_requests = [r for p in pairs for r in p.requests(("ref",))]
    other_logps = {name: _score(other, policy_prompt_requests) for name, other in (others or {}).items()}
    if ce is not None:  # written as `*_ce_logps` with the other models' columns
        other_logps["ce"] = _score(ce, policy_prompt_requests)
    top = _score_topk(scorer, policy_prompt_requests, topk) if topk else None
    rows = []
    for n, p in enumerate(pairs):
        row = {"id": p.pair.id, "prompt": p.pair.prompt, "chosen": [p.pair.chosen], "rejected": [p.pair.rejected],
               "prompt_ids": p.prompt_ids}
        edit_rewards = None if "better" in contexts else edit_diff_rewards(p.chosen.ids, p.rejected.ids)
        for s, (side, response) in enumerate(zip(SIDES, (p.chosen, p.rejected))):
            first = (n * len(SIDES) + s) * len(contexts)  # requests() order: side, then context
            by_context = dict(zip(contexts, logps[first:first + len(contexts)], strict=True))
            row[column(side, "ids")] = response.ids
            for context, values in by_context.items():
                row[column(side, f"{context}_logps")] = values
            row[column(side, "rewards")] = (edit_rewards[s] if edit_rewards is not None
                                            else contrastive_rewards(by_context["better"], by_context["worse"]))
            for name, values in other_logps.items():
                row[column(side, f"{name}_logps")] = values[n * len(SIDES) + s]
            if "dpo" in other_logps:  # σ(log π_dpo − log π_ref) − 0.5: the same transform (METHOD.md §3)
                dpo_logps = row[column(side, "dpo_logps")]
                row[column(side, "dpo_rewards")] = contrastive_rewards(dpo_logps, by_context["ref"])
            if top is not None:  # a list of rows: Arrow takes a list of lists, not a 2-D array
                ids, top_logps = top[n * len(SIDES) + s]
                row[column(side, "ref_topk_ids")] = list(ids)
                row[column(side, "ref_topk_logps")] = list(top_logps)
        rows.append(row)
    return rows


def _score(scorer: Scorer, requests: list) -> list:
    results = scorer.score(requests)
    if len(results) != len(requests):  # results are matched to requests by index
        raise RuntimeError(f"the scorer returned {len(results)} results for {len(requests)} sequences")
    return results


def _score_topk(scorer: Scorer, requests: list, k: int) -> list[TopK]:
    """The scorer's top-k of each request, checked: k finite log-probs in range, by log-prob, per response token. A
    log-prob below the range's floor (a probability that is 0 in float32) is stored as the floor."""
    results = scorer.score_topk(requests, k)
    if len(results) != len(requests):
        raise RuntimeError(f"the scorer returned {len(results)} top-{k} results for {len(requests)} sequences")
    checked = []
    for (_, response), (ids, logps) in zip(requests, results):
        ids, logps = np.asarray(ids, dtype=np.int32), np.asarray(logps, dtype=np.float32)
        if ids.shape != (len(response), k) or logps.shape != ids.shape:
            raise RuntimeError(f"the scorer returned top-{k} arrays of shape {ids.shape}, {logps.shape} for "
                               f"{len(response)} response tokens")
        logps = np.maximum(logps, np.float32(LOGPROB_RANGE[0]))  # NaN stays NaN, and is refused below
        if (ids < 0).any() or not (logps <= LOGPROB_RANGE[1]).all() or (np.diff(logps, axis=-1) > 0).any():
            raise RuntimeError(f"the scorer's top-{k} holds a negative token id, a NaN or a log-prob above "
                               f"{LOGPROB_RANGE[1]:g}, or is not sorted by log-prob")
        checked.append((ids, logps))
    return checked
