"""The shard contract between the stages: what a treg-score output folder holds, and the one
place both stages (and anyone loading the shards) take its names and types from.

    data/*.parquet     shards of the schema below, the provenance in each file's metadata
    manifest.json      written once every scoring worker has finished: counts and the shard list
    skipped.jsonl      one line per skipped input row: id, reason, detail

One row per preference pair. `prompt`, `chosen` and `rejected` are stored in TRL's
conversational form with an explicit prompt (message lists of role and content), so every
shard has one schema whatever the input's format; plain-string inputs become one message each.
Per side (`chosen_`, `rejected_`), the response token ids and one float32 per token of each
TOKEN_FLOAT_COLUMNS: every per-token list has exactly the length of its `*_ids`. The token
sequence a model sees is `prompt_ids + {side}_ids`. OPTIONAL_TOKEN_FLOAT_COLUMNS are there only
when the run asked for them (`dpo_rewards`: treg-score --dpo-model), so a folder's schema is
`shard_schema(...)` of its provenance; SCHEMA is the default one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from treg_data.errors import UserError

SIDES = ("chosen", "rejected")
TOKEN_FLOAT_COLUMNS = ("ref_logps", "better_logps", "worse_logps", "rewards")
OPTIONAL_TOKEN_FLOAT_COLUMNS = ("dpo_rewards",)  # written only with treg-score --dpo-model
METADATA_KEY = b"treg"  # Parquet metadata key of the provenance
FORMAT = "treg-shards/1"
DATA_DIR, SHARD_GLOB, MANIFEST, SKIPPED = "data", "*.parquet", "manifest.json", "skipped.jsonl"

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TOKEN_IDS = pa.list_(pa.int32())
TOKEN_FLOATS = pa.list_(pa.float32())


def column(side: str, name: str) -> str:
    """The column of `name` ("ids", "rewards", ...) for one side: "chosen_rewards"."""
    return f"{side}_{name}"


def side_columns(side: str, names: tuple[str, ...] = ("ids",) + TOKEN_FLOAT_COLUMNS) -> list[str]:
    return [column(side, name) for name in names]


def shard_schema(dpo_rewards: bool = False) -> pa.Schema:
    """The shards' schema; with `dpo_rewards`, each side's `*_dpo_rewards` follows its `*_rewards`."""
    names = ("ids",) + TOKEN_FLOAT_COLUMNS + (OPTIONAL_TOKEN_FLOAT_COLUMNS if dpo_rewards else ())
    return pa.schema(
        [("id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
         ("prompt_ids", TOKEN_IDS)]
        + [(name, TOKEN_IDS if name.endswith("_ids") else TOKEN_FLOATS)
           for side in SIDES for name in side_columns(side, names)]
    )


def provenance_schema(provenance: dict) -> pa.Schema:
    """The schema of shards written with this provenance (older folders lack the optional keys)."""
    return shard_schema(dpo_rewards=provenance.get("dpo_model") is not None)


SCHEMA = shard_schema()  # the default: no optional columns


def shard_files(folder: str | Path) -> list[Path]:
    """The shards of an output folder (or of its data/ folder), in name order."""
    folder = Path(folder)
    files = sorted((folder / DATA_DIR).glob(SHARD_GLOB) if (folder / DATA_DIR).is_dir() else folder.glob(SHARD_GLOB))
    if not files:
        raise UserError(f"no .parquet shards in {folder}; give a treg-score output folder")
    return files


def output_root(folder: str | Path) -> Path:
    """The output folder, given it or its data/ folder."""
    folder = Path(folder)
    return folder.parent if folder.name == DATA_DIR and not (folder / DATA_DIR).is_dir() else folder


def read_shard_metadata(path: str | Path) -> dict:
    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise UserError(f"{path} is not a treg shard (no '{METADATA_KEY.decode()}' metadata)")
    return json.loads(metadata[METADATA_KEY])


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that maps text to ids: vocabulary, added tokens, special tokens and
    chat template. Training refuses shards whose fingerprint differs from its policy's."""
    blob = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "added": sorted((str(k), str(v)) for k, v in tokenizer.added_tokens_decoder.items()),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "chat_template": tokenizer.chat_template,
        },
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
