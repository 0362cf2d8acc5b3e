"""treg-score's reward check: treg-probe's measurement (treg_data.probe) on the shipped pairs, in the run's own
engine, before any pair is scored. It says in one line how well the chosen prompt set's r̂ locates errors on
this model, warns when it cannot (naming a better set), and with `--revision-prompts auto` picks the best set."""

from __future__ import annotations

import sys

from tqdm import tqdm

from treg_core.errors import UserError
from treg_data.encoding import PairEncoder
from treg_data.lengths import LengthLimits
from treg_data.probe import BASELINE, NoProbePair, best_set, check_line, load_probe_pairs, probe, warn_if_weak
from treg_data.revision_prompts import SHIPPED, RevisionPrompts
from treg_data.scorers import Scorer


def run_check(scorer: Scorer, tokenizer, limits: LengthLimits, chosen: RevisionPrompts | None,
              seed: int = 0) -> tuple[RevisionPrompts, dict | None]:
    """The set to score with (`chosen`, or with None the shipped set that checks best) and the record for the
    manifest: treg-probe's JSON object plus `used`, the set scored with (None when no probe pair fits the
    engine's context)."""
    items, _ = load_probe_pairs()
    # The probe pairs need only fit the engine, whatever the run's own length limits for its data.
    limits = LengthLimits(limits.max_model_len, limits.max_model_len, limits.max_model_len)
    candidates = dict(SHIPPED) if chosen is None else {chosen.name: chosen}
    try:
        result = probe(items, _encoders(tokenizer, candidates, limits), scorer, seed=seed)
    except UserError as err:
        if isinstance(err, NoProbePair):  # the probe's own fix names treg-probe's flags
            err = NoProbePair(err.skipped, "raise --max-model-len" + (", or name a set" if chosen is None else ""))
        if chosen is None:
            raise UserError(f"--revision-prompts auto: {err}") from None
        _say(f"reward check: not run ({err})")
        return chosen, None
    used = SHIPPED[result["best"]] if chosen is None else chosen
    _say(f"reward check: {check_line(f'set {used.name}', result['sets'][used.name])}; the reference log-prob "
         f"alone: {result[BASELINE]['auroc']:.2f}")
    if chosen is None:
        ranking = ", ".join(f"{n} {r['auroc']:.2f}" for n, r in result["sets"].items())
        _say(f"--revision-prompts auto: chose {used.name!r}, the best reward check of the shipped sets ({ranking})")
    weak = warn_if_weak(used.name, result["sets"][used.name])
    if weak and chosen is not None:  # measure the other shipped sets, so the warning can name a better one
        others = {n: p for n, p in SHIPPED.items() if p != chosen}
        result["sets"].update(_other_sets(items, tokenizer, others, limits, scorer, seed))
        result["best"] = best_set(result["sets"])
        weak = warn_if_weak(used.name, result["sets"][used.name], result["sets"])
    if weak:
        _say(weak)
    return used, {"used": used.name, **result}


def _other_sets(items, tokenizer, others: dict[str, RevisionPrompts], limits: LengthLimits, scorer: Scorer,
                seed: int) -> dict[str, dict]:
    """The checks of the other shipped sets, for the warning: together, on the same pairs; where a set's longer
    prompts leave no pair within the engine's context, each set alone, without the sets that fit none. The run
    goes on either way: the warning only names a better set if it can."""
    try:
        return probe(items, _encoders(tokenizer, others, limits), scorer, seed=seed)["sets"]
    except NoProbePair:
        sets = {}
        for name, prompts in others.items():
            try:
                sets.update(probe(items, _encoders(tokenizer, {name: prompts}, limits), scorer, seed=seed)["sets"])
            except NoProbePair:
                continue
        return sets


def _encoders(tokenizer, sets: dict[str, RevisionPrompts], limits: LengthLimits) -> dict[str, PairEncoder]:
    return {name: PairEncoder(tokenizer, prompts, limits) for name, prompts in sets.items()}


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)
