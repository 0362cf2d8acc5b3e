"""The token signals of treg-train's token weightings (treg_core.contract.SIGNALS), as treg-score writes them: each
shard records the largest |s_t| of every signal it holds, and a signal that will be, or turned out, 0 on every
token is said in one warning: from the settings before any engine starts, from the shards' records once the
folder is finished."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from treg_core.contract import (
    POLICY_PROMPT_COLUMNS,
    SIDES,
    SIGNALS,
    column,
    model_identity,
    open_shard,
    recorded_zero,
    shard_files,
    signal_extents,
    signal_name,
    zero_signals,
)


def largest_signals(table: pa.Table) -> dict[str, float]:
    """The largest |s_t| over both sides' tokens of each signal whose two columns the table holds, by signal_name."""
    names = set(table.column_names)
    return {signal_name(signal): max(_largest_difference(table, side, signal) for side in SIDES)
            for signal in SIGNALS if {column(SIDES[0], name) for name in signal} <= names}


def _largest_difference(table: pa.Table, side: str, signal: tuple[str, str]) -> float:
    first, second = (pc.list_flatten(table.column(column(side, name))).to_numpy(zero_copy_only=False)
                     .astype(np.float64) for name in signal)
    return float(np.abs(first - second).max()) if len(first) else 0.0


def warn_on_settings(config) -> list[tuple[str, str]]:
    """A warning for each signal that the models of a treg-score run (ScoreConfig) make 0 on every token; returns
    those signals."""
    signals = zero_signals(config.scorer_model or config.model, config.model_revision, config.dpo_model,
                           config.reverse_dpo_model)
    for first, second in signals:
        flags = " and ".join(flag for name, flag in POLICY_PROMPT_COLUMNS.items() if name in (first, second))
        rewards = "*_dpo_rewards and " if second == "ref_logps" else ""
        print(f"treg-score: warning: {flags} are one model ({config.dpo_model}): *_{first} will equal *_{second}, "
              f"so {rewards}the token signal *_{first} - *_{second} that treg-train's token weightings read will be "
              f"0 on every token; give {SIGNALS[first, second].needs}", file=sys.stderr)
    if config.ce_scores and model_identity(config.dpo_model) == model_identity(config.reverse_dpo_model):
        print(f"treg-score: warning: --ce-scores with one model as --dpo-model and --reverse-dpo-model "
              f"({config.dpo_model}): softmax(2·log π − log π) is π, so *_ce_logps will be that model's own log-probs "
              "and cDPO's weights contrast nothing; give a negative model (trained on incorrect answers) as "
              "--reverse-dpo-model", file=sys.stderr)
    return signals


def warn_on_shards(folder: str | Path, said: list[tuple[str, str]]) -> None:
    """A warning for each signal that every shard of a finished folder records as 0 on every token, unless `said`
    from the settings already."""
    extents = [signal_extents(open_shard(file).schema_arrow) for file in shard_files(folder)]
    for first, second in SIGNALS:
        if (first, second) not in said and recorded_zero((first, second), extents):
            print(f"treg-score: warning: *_{first} equals *_{second} on every token in {folder}, so the token signal "
                  f"*_{first} - *_{second} that treg-train's token weightings read is 0 there; score it again with "
                  f"{SIGNALS[first, second].needs}", file=sys.stderr)
