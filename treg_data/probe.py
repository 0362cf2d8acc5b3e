"""The reward check: how well does a token-reward source locate the errors of labelled minimal-edit pairs?
(docs/METHOD.md, "The reward check".)

Each pair's rejected answer is its chosen one with a span edited to make it wrong. The edited tokens
(treg_data.edits) are the positives; a good token reward gives them the lowest values. Measured over the
rejected answers' tokens, pooled over pairs:

- AUROC of −r as a detector of the edited tokens, ties counting ½ (0.5 is chance);
- a 95% bootstrap interval of that AUROC, resampling pairs;
- lowest_on_edit: the share of rejected answers whose lowest r falls on an edited token (a tie shares its credit).

A pair whose answers have the same tokens, whose rejected answer has no edited token (its edit only removes text),
or no unedited one but its last, measures nothing of that and is left out, counted by reason
(`identical_responses`, `no_edit`, `whole_answer_edited`).

Sources: each revision-prompt set (r̂ from its two contexts), the reference log-prob alone (a baseline:
a surprising token is often a wrong one), and with a DPO model its DPO reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from treg_core.errors import BadRow, UserError
from treg_data.edits import edited_mask
from treg_data.encoding import PairEncoder
from treg_data.inputs import InvalidRow, open_source
from treg_data.pairs import Columns, PreferencePair, parse_pair
from treg_data.rewards import contrastive_rewards
from treg_data.scorers import Scorer

SHIPPED_PAIRS = Path(__file__).with_name("probe_pairs.jsonl")
BASELINE = "baseline_ref_logp"
DPO_SOURCE = "dpo_rewards"
WARN_BELOW = 0.6  # an interval whose upper end is below this cannot be trusted to locate errors
BOOTSTRAP = 1000


@dataclass(frozen=True)
class ProbeItem:
    pair: PreferencePair
    kind: str


@dataclass(frozen=True)
class Scored:
    """One pair's rejected-answer token rewards from one source, with its labels."""

    rewards: np.ndarray
    edited: np.ndarray
    kind: str


def load_probe_pairs(path: str | Path | None = None) -> tuple[list[ProbeItem], dict[str, int]]:
    """The pairs of a probe file (treg-score's input format, an optional `kind` column), and the rows skipped by
    reason."""
    if path and not Path(path).exists():
        raise UserError(f"--pairs {path}: no such file; give a JSONL, JSON or Parquet file of labelled pairs")
    try:
        source = open_source(str(path or SHIPPED_PAIRS))
    except UserError as err:  # treg-score's reader names its own flag
        raise UserError(str(err).replace("--dataset", "--pairs")) from None
    items, skipped, first = [], {}, None
    for number, row in source.rows(0, source.num_rows):
        try:
            if isinstance(row, InvalidRow):
                raise BadRow(row.reason, row.detail)
            items.append(ProbeItem(parse_pair(row, Columns()), _kind(row.get("kind"))))
        except BadRow as bad:
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            first = first or f"row {number + 1}: {bad}"
    if not items:
        found = f"{skipped}; {first}" if skipped else "the file is empty"
        raise UserError(f"{path or SHIPPED_PAIRS}: no usable pair to probe with ({found}); give rows with prompt, "
                        "chosen and rejected, as treg-score reads them")
    return items, skipped


def _kind(value) -> str:
    """A row's `kind` label: missing or empty is "all"; a string or a number as written; anything else is refused,
    since the table would show its Python repr as a kind."""
    if value is None or value == "":
        return "all"
    if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return str(value)
    raise BadRow("malformed_field", f"kind must be a string or a number, got {type(value).__name__}")


# ---- the metric -----------------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` as a detector of `labels`, ties counting ½ (Mann-Whitney U)."""
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if not positives or not negatives:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties at their average rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def lowest_on_edit(scored: Scored) -> float:
    """1 when the answer's lowest reward is on an edited token, 0 when not; a tie shares the credit."""
    lowest = scored.rewards == scored.rewards.min()
    return float(scored.edited[lowest].mean())


def pooled_auroc(pairs: list[Scored]) -> float:
    return auroc(-np.concatenate([p.rewards for p in pairs]), np.concatenate([p.edited for p in pairs]))


def summary(pairs: list[Scored], seed: int = 0, samples: int = BOOTSTRAP) -> dict:
    """AUROC, its bootstrap interval over pairs, and lowest_on_edit."""
    rng = np.random.default_rng(seed)
    resampled = [pooled_auroc([pairs[i] for i in rng.integers(0, len(pairs), len(pairs))]) for _ in range(samples)]
    resampled = [x for x in resampled if not math.isnan(x)]
    low, high = np.percentile(resampled, [2.5, 97.5]) if resampled else (math.nan, math.nan)
    return {"auroc": _round(pooled_auroc(pairs)), "ci": [_round(low), _round(high)],
            "lowest_on_edit": _round(float(np.mean([lowest_on_edit(p) for p in pairs]))), "pairs": len(pairs)}


def source_summary(pairs: list[Scored], seed: int = 0, samples: int = BOOTSTRAP) -> dict:
    """`summary` over all pairs, and by kind."""
    kinds = sorted({p.kind for p in pairs})
    return {**summary(pairs, seed, samples),
            "by_kind": {k: summary([p for p in pairs if p.kind == k], seed, samples) for k in kinds}}


def _round(x: float) -> float:
    return round(float(x), 4)


# ---- scoring the pairs -----------------------------------------------------------------------------


UNLABELLED = ("identical_responses", "no_edit", "whole_answer_edited")  # the pairs' fault, not the model's


class NoProbePair(UserError):
    """No pair is left to measure on; the caller adds the fix that its own flags allow."""

    def __init__(self, skipped: dict[str, int], fix: str = "give --pairs that fit it"):
        if set(skipped) <= set(UNLABELLED):
            fix = "give pairs whose rejected answer changes a span inside text it shares with the chosen one"
        super().__init__(f"no probe pair is left to measure on this model ({skipped}); {fix}")
        self.skipped = skipped


def _unlabelled(edited: np.ndarray) -> BadRow | None:
    """Why a rejected answer's edit labels cannot be measured, or None: with no edited token there is nothing to
    locate (the AUROC has no positive), and with every token but the last (the end of turn) edited, the lowest
    reward is on the edit whatever the reward (the AUROC has at most that one negative)."""
    if not edited.any():
        return BadRow("no_edit", "the rejected answer has no edited token (the edit only removes text)")
    if edited[:-1].all():
        return BadRow("whole_answer_edited", "the edit is the whole rejected answer; leave shared text around it")
    return None


def score_sources(items: list[ProbeItem], encoders: dict[str, PairEncoder], scorer: Scorer,
                  dpo_scorer: Scorer | None = None) -> tuple[dict[str, list[Scored]], dict[str, int]]:
    """Each source's Scored pairs, in one call of each scorer; a pair that one set cannot encode is left out
    of every source, so all sources are measured on the same pairs. Returns them and the skips by reason."""
    kept, skipped = [], {}
    for item in items:
        try:
            encoded = {name: encoder.encode(item.pair) for name, encoder in encoders.items()}
            response = next(iter(encoded.values()))
            edited = edited_mask(response.rejected.ids, response.chosen.ids)
            unlabelled = _unlabelled(edited)
            if unlabelled:
                raise unlabelled
        except BadRow as bad:
            skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            continue
        kept.append((item, encoded, edited))
    if not kept:
        raise NoProbePair(skipped)
    requests = []
    for _, encoded, _ in kept:
        first = next(iter(encoded.values())).rejected
        requests.append((first.prefixes["ref"], first.ids))
        requests += [(e.rejected.prefixes[d], e.rejected.ids) for e in encoded.values() for d in ("better", "worse")]
    step = 1 + 2 * len(encoders)  # requests per pair: the policy prompt's, then each set's two
    logps = scorer.score(requests)
    dpo_logps = dpo_scorer.score(requests[::step]) if dpo_scorer else None
    sources: dict[str, list[Scored]] = {name: [] for name in [*encoders, BASELINE] + ([DPO_SOURCE] * bool(dpo_scorer))}
    for n, (item, _, edited) in enumerate(kept):
        ref, rest = logps[n * step], logps[n * step + 1:(n + 1) * step]
        for k, name in enumerate(encoders):
            sources[name].append(Scored(contrastive_rewards(rest[2 * k], rest[2 * k + 1]), edited, item.kind))
        sources[BASELINE].append(Scored(np.asarray(ref, dtype=np.float32), edited, item.kind))
        if dpo_logps is not None:
            sources[DPO_SOURCE].append(Scored(contrastive_rewards(dpo_logps[n], ref), edited, item.kind))
    return sources, skipped


def probe(items: list[ProbeItem], encoders: dict[str, PairEncoder], scorer: Scorer, dpo_scorer: Scorer | None = None,
          seed: int = 0, samples: int = BOOTSTRAP) -> dict:
    """The reward check of every prompt set in `encoders` (by name), the baseline and the DPO reward, as the
    JSON object treg-probe prints last."""
    sources, skipped = score_sources(items, encoders, scorer, dpo_scorer)
    sets = {name: source_summary(sources[name], seed, samples) for name in encoders}
    result = {"sets": sets, BASELINE: source_summary(sources[BASELINE], seed, samples)}
    if DPO_SOURCE in sources:
        result[DPO_SOURCE] = source_summary(sources[DPO_SOURCE], seed, samples)
    result["best"] = best_set(sets)
    result["pairs"] = len(sources[BASELINE])
    result["skipped"] = skipped
    return result


def best_set(sets: dict[str, dict]) -> str:
    """The name of the set with the highest AUROC (the first of equals)."""
    return max(sets, key=lambda name: -math.inf if math.isnan(sets[name]["auroc"]) else sets[name]["auroc"])


# ---- what a person reads -----------------------------------------------------------------------------


def check_line(name: str, result: dict) -> str:
    """One line on a source: AUROC, interval, lowest_on_edit, pairs."""
    low, high = result["ci"]
    return (f"AUROC {result['auroc']:.2f} [{low:.2f}, {high:.2f}], lowest r on the edit in "
            f"{result['lowest_on_edit']:.0%} of {result['pairs']} pairs ({name})")


def table(result: dict) -> str:
    """The probe's table: one row per source, the AUROC by kind in the last columns."""
    rows = [(f"set {name}", r) for name, r in result["sets"].items()]
    rows += [(name, result[name]) for name in (BASELINE, DPO_SOURCE) if name in result]
    kinds = sorted({k for _, r in rows for k in r["by_kind"]})
    head = ["source", "AUROC", "95% CI", "lowest on edit", *kinds]
    lines = [head] + [[name, f"{r['auroc']:.3f}", f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]",
                       f"{r['lowest_on_edit']:.0%}", *(f"{r['by_kind'][k]['auroc']:.2f}" if k in r["by_kind"]
                                                       else "-" for k in kinds)] for name, r in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def warn_if_weak(name: str, result: dict, others: dict | None = None) -> str | None:
    """The warning treg-score prints when the interval's upper end is below WARN_BELOW, naming the best of
    `others` when that one is not weak itself."""
    if not result["ci"][1] < WARN_BELOW:
        return None
    better = best_set(others) if others else None
    hint = (f"--revision-prompts {better} does better here (AUROC {others[better]['auroc']:.2f})"
            if better and better != name and others[better]["ci"][1] >= WARN_BELOW else
            "No shipped set does better; consider --token-rewards edit-diff for near-edit data, or a larger model")
    return (f"warning: on treg's probe pairs, the token rewards of {name!r} do not locate errors (AUROC interval "
            f"below {WARN_BELOW}), so on data like them T-REG would regularise towards noise. {hint}; measure on "
            "pairs like yours with treg-probe --pairs")
