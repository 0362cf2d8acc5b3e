"""The shard contract between the stages (DESIGN.md): column names, Arrow types, metadata key.

One row per preference pair. `prompt`, `chosen` and `rejected` are stored in TRL's
conversational form with an explicit prompt (message lists of role and content), so every
shard has one schema whatever the input's format; plain-string inputs become one message each.
Every per-token list has exactly the length of its `*_ids`.
"""

from __future__ import annotations

import pyarrow as pa

SIDES = ("chosen", "rejected")
TOKEN_FLOAT_COLUMNS = ("ref_logps", "better_logps", "worse_logps", "rewards")
METADATA_KEY = b"treg"

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TOKEN_IDS = pa.list_(pa.int32())
TOKEN_FLOATS = pa.list_(pa.float32())


def side_columns(side: str) -> list[str]:
    return [f"{side}_ids"] + [f"{side}_{name}" for name in TOKEN_FLOAT_COLUMNS]


SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
     ("prompt_ids", TOKEN_IDS)]
    + [(name, TOKEN_IDS if name.endswith("_ids") else TOKEN_FLOATS) for side in SIDES for name in side_columns(side)]
)
