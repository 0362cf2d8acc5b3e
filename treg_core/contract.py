"""The contract between the stages: what a treg-score output folder holds, and the one place both
stages (and anyone loading the shards) take its names, types and records from.

    data/{split}-{worker:05d}-of-{workers:05d}-{shard:05d}.parquet   shards, rows in input order
    manifests/worker-{worker:05d}-of-{workers:05d}.json                a WorkerManifest, once that worker finished
    manifest.json                                                     the Manifest, once every worker has
    skipped.jsonl                                                     one line per skipped input row: id, reason, detail
    .treg                                                             the folder is treg-score's (treg_core.folders)

One row per preference pair. `prompt`, `chosen` and `rejected` are stored in TRL's conversational
form with an explicit prompt (message lists of role and content), so every shard has one schema
whatever the input's format; plain-string inputs become one message each. Per side (`chosen_`,
`rejected_`), one value per response token of each per-token column in COLUMNS, the one table of them:
their kind and range, the treg-score option that writes them, the model that does. Every per-token list has
exactly the length of its `*_ids`, and its values in the column's range; a top-k column (`--ref-topk K`) holds one
list of exactly K values per response token. The token sequence a model sees is
`prompt_ids + {side}_ids`. A column with an option is there only when the run gave it (`--dpo-model`, ...), and
the revision columns are left out under --token-rewards edit-diff, so a folder's schema is its provenance's
`schema`. Beside its ShardMetadata, a shard's Parquet metadata records (SIGNALS_KEY) the
largest |s_t| of each token signal (SIGNALS) it holds, so that training refuses a signal that is 0 on every
token without reading a row.

The records (Provenance, ShardMetadata, WorkerManifest, Manifest) are dataclasses written as JSON and
read back by `from_dict`, which names any missing or unknown key: a field renamed in one stage fails
loudly where the other reads it, instead of reading as None.
"""

from __future__ import annotations

import hashlib
import json
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from treg_core.errors import UserError, unreadable
from treg_core.folders import owned_by

SIDES = ("chosen", "rejected")
CONTEXTS = ("ref", "better", "worse")  # what precedes a response when it is scored: policy prompt, x_better, x_worse

# ---- the per-token columns: one table -------------------------------------------------------------------

# A column's kind decides its type and range. Log-probs are at most 0 (a little rounding above is allowed) and never
# below -1e4; token rewards lie in the transform's (-0.5, 0.5); ids are token ids of the model's vocabulary. The top-k
# kinds hold K values per response token (a list of lists): token ids, most likely first, and their log-probs.
IDS, LOGPROB, REWARD = "token ids", "log-prob", "token reward"
TOPK_IDS, TOPK_LOGPROB = "top-k token ids", "top-k log-probs"
ID_KINDS = (IDS, TOPK_IDS)  # no range: token ids
LOGPROB_RANGE, REWARD_RANGE = (-1e4, 1e-4), (-0.5, 0.5)
KIND_RANGES = {LOGPROB: LOGPROB_RANGE, REWARD: REWARD_RANGE, TOPK_LOGPROB: LOGPROB_RANGE}


@dataclass(frozen=True)
class TokenColumn:
    """A per-token column, stored once per side (`chosen_<name>`, `rejected_<name>`), one value per response token."""

    name: str
    kind: str  # IDS, LOGPROB, REWARD, TOPK_IDS or TOPK_LOGPROB
    written_with: str | None  # the treg-score option that adds it to the shards; None: every shard holds it
    model: str  # the Provenance field naming the model whose numbers it holds
    meaning: str  # one line, as the dataset card and the docs show it

    @property
    def range(self) -> tuple[float, float] | None:
        return KIND_RANGES.get(self.kind)


COLUMNS = {c.name: c for c in (
    TokenColumn("ids", IDS, None, "model", "response token ids, end-of-turn included; the sequence is "
                                           "`prompt_ids + *_ids`"),
    TokenColumn("ref_logps", LOGPROB, None, "scorer_model", "log-prob of each response token after the policy prompt "
                                                            "(the reference model)"),
    TokenColumn("better_logps", LOGPROB, "--token-rewards contrastive", "scorer_model",
                "log-prob of each response token after `x_better`"),
    TokenColumn("worse_logps", LOGPROB, "--token-rewards contrastive", "scorer_model",
                "log-prob of each response token after `x_worse`"),
    TokenColumn("rewards", REWARD, None, "scorer_model", "the token reward above"),
    TokenColumn("dpo_logps", LOGPROB, "--dpo-model", "dpo_model",
                "log-prob of each response token after the policy prompt under the DPO-trained model"),
    TokenColumn("dpo_rewards", REWARD, "--dpo-model", "dpo_model",
                "`sigmoid(dpo_logps - ref_logps) - 0.5` per token"),
    TokenColumn("rev_dpo_logps", LOGPROB, "--reverse-dpo-model", "reverse_dpo_model",
                "the same under the model trained with chosen and rejected swapped (TIS-DPO's contrastive pair, "
                "with `*_dpo_logps`)"),
    TokenColumn("ref_topk_ids", TOPK_IDS, "--ref-topk", "scorer_model",
                "the reference's K most likely token ids at each response position, most likely first"),
    TokenColumn("ref_topk_logps", TOPK_LOGPROB, "--ref-topk", "scorer_model",
                "their log-probs under the reference, in the same order"),
    TokenColumn("ce_logps", LOGPROB, "--ce-scores", "dpo_model",
                "log p_ce(y_t) = log softmax_v(2·log π_pos − log π_neg)[y_t]: cDPO's contrastive estimate, of the "
                "positive (--dpo-model) and negative (--reverse-dpo-model) models"),
)}
TOKEN_FLOAT_COLUMNS = tuple(name for name, c in COLUMNS.items() if c.kind not in ID_KINDS and c.written_with in (
    None, "--token-rewards contrastive"))  # the columns of a default run
COLUMN_RANGES = {name: c.range for name, c in COLUMNS.items() if c.range}  # checked where training reads a column
COLUMN_SOURCES = {name: c.written_with for name, c in COLUMNS.items() if c.written_with}
REVISION_COLUMNS = tuple(n for n, c in COLUMNS.items() if c.written_with == "--token-rewards contrastive")
METADATA_KEY = b"treg"  # Parquet metadata key of a shard's ShardMetadata
FORMAT = "treg-shards/1"


@dataclass(frozen=True)
class Signal:
    """A token signal s_t = first − second of two log-prob columns, as treg-train's token weightings read it."""

    first: str
    second: str
    needs: str  # what treg-score must be given for it to be other than 0 on every token
    shown_as: str | None = None  # treg-inspect's row of it (None: not shown, r̂ shows it already)
    symbol: str = ""  # its values' label there
    meaning: str = ""  # the row's legend: what it is, and which methods read it

    @property
    def columns(self) -> tuple[str, str]:
        return self.first, self.second


SIGNALS = {s.columns: s for s in (
    Signal("dpo_logps", "ref_logps", "a DPO-trained model as --dpo-model, not the policy (--model) itself",
           "dpo", "log π_dpo/π_ref", "DPO model's token log-ratio (TGDPO's and SePO's signal)"),
    Signal("dpo_logps", "rev_dpo_logps", "the model trained with chosen and rejected swapped (treg-train "
                                         "--swap-pairs) as --reverse-dpo-model, not the --dpo-model",
           "contrast", "log π_dpo/π_rev", "DPO vs reverse-DPO model (TIS-DPO's signal)"),
    Signal("better_logps", "worse_logps", "a revision prompt set whose two prompts differ (--revision-prompts)"),
)}
SIGNALS_KEY = b"treg-signals"  # Parquet metadata key of a shard's largest |s_t| of each signal it holds, by name
# The columns of log-probs after the policy prompt, by the flag naming their model: one model in both columns of a
# signal makes it 0 on every token.
POLICY_PROMPT_COLUMNS = {"ref_logps": "--model", "dpo_logps": "--dpo-model", "rev_dpo_logps": "--reverse-dpo-model"}


def columns_written(options: set[str | None]) -> tuple[str, ...]:
    """The per-side columns of shards written with the treg-score `options` (COLUMNS' `written_with`), in order."""
    return tuple(name for name, c in COLUMNS.items() if c.written_with is None or c.written_with in options)


def missing_column_advice(names: list[str]) -> str:
    """What writes the per-side columns `names` (as `chosen_dpo_logps`), for a refusal of shards that lack them."""
    sources = sorted({COLUMN_SOURCES[n.split("_", 1)[1]] for n in names if n.split("_", 1)[-1] in COLUMN_SOURCES})
    return (f"treg-score writes them with {' and '.join(sources)}: score the data with it" if sources
            else "was it written by treg-score?")


# ---- the folder's layout ----------------------------------------------------------------------------

DATA_DIR, MANIFESTS_DIR, MANIFEST, SKIPPED = "data", "manifests", "manifest.json", "skipped.jsonl"
SHARD_GLOB, FIRST_SHARD_GLOB, WORKER_MANIFEST_GLOB = "*.parquet", "*-00000.parquet", "worker-*.json"


def worker_prefix(split: str, worker: int, workers: int) -> str:
    """The start of every shard name of one worker."""
    return f"{split}-{worker:05d}-of-{workers:05d}-"


def shard_name(split: str, worker: int, workers: int, number: int) -> str:
    return f"{worker_prefix(split, worker, workers)}{number:05d}.parquet"


def worker_manifest_path(root: str | Path, worker: int, workers: int) -> Path:
    return Path(root) / MANIFESTS_DIR / f"worker-{worker:05d}-of-{workers:05d}.json"


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


# ---- the columns ------------------------------------------------------------------------------------

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TOKEN_IDS = pa.list_(pa.int32())
TOKEN_FLOATS = pa.list_(pa.float32())
KIND_TYPES = {IDS: TOKEN_IDS, LOGPROB: TOKEN_FLOATS, REWARD: TOKEN_FLOATS,
              TOPK_IDS: pa.list_(TOKEN_IDS), TOPK_LOGPROB: pa.list_(TOKEN_FLOATS)}  # one inner list per token


def column(side: str, name: str) -> str:
    """The column of `name` ("ids", "rewards", ...) for one side: "chosen_rewards"."""
    return f"{side}_{name}"


def side_columns(side: str, names: tuple[str, ...] = ("ids",) + TOKEN_FLOAT_COLUMNS) -> list[str]:
    return [column(side, name) for name in names]


def shard_schema(dpo: bool = False, reverse_dpo: bool = False, revision: bool = True, topk: bool = False,
                 ce: bool = False) -> pa.Schema:
    """The shards' schema; each side's columns in COLUMNS' order."""
    options = {"--token-rewards contrastive" if revision else None, "--dpo-model" if dpo else None,
               "--reverse-dpo-model" if reverse_dpo else None, "--ref-topk" if topk else None,
               "--ce-scores" if ce else None}
    return pa.schema(
        [("id", pa.string()), ("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES),
         ("prompt_ids", TOKEN_IDS)]
        + [(name, KIND_TYPES[COLUMNS[name.split("_", 1)[1]].kind])
           for side in SIDES for name in side_columns(side, columns_written(options))]
    )


SCHEMA = shard_schema()  # the default: no optional columns


def signal_name(signal: tuple[str, str]) -> str:
    """A signal as records key it and messages name it: "dpo_logps - ref_logps"."""
    return " - ".join(signal)


def model_identity(name: str | None, revision: str | None = None) -> str | None:
    """One string per model: a local folder's resolved path, else the Hub id, with its revision if one is given."""
    if name is None:
        return None
    local = Path(name).expanduser()
    return (str(local.resolve()) if local.exists() else name) + (f"@{revision}" if revision else "")


def zero_signals(scorer_model: str, revision: str | None, dpo_model: str | None,
                 reverse_dpo_model: str | None) -> list[tuple[str, str]]:
    """The SIGNALS (their columns) that are 0 on every token by construction, given the models of the
    POLICY_PROMPT_COLUMNS (the reference log-probs' under --model-revision, the others' without): both columns hold
    one model's log-probs after the policy prompt."""
    models = {"ref_logps": model_identity(scorer_model, revision), "dpo_logps": model_identity(dpo_model),
              "rev_dpo_logps": model_identity(reverse_dpo_model)}
    return [s for s in SIGNALS if models.get(s[0]) is not None and models.get(s[0]) == models.get(s[1])]


def signal_extents(schema: pa.Schema) -> dict[str, float] | None:
    """A shard's largest |s_t| of each signal it holds, by signal_name; None for a shard that does not record them
    (written before treg did)."""
    metadata = schema.metadata or {}
    return json.loads(metadata[SIGNALS_KEY]) if SIGNALS_KEY in metadata else None


def recorded_zero(signal: tuple[str, str], extents: list[dict[str, float] | None]) -> bool:
    """Whether every shard (`extents`: each one's signal_extents) records `signal` as 0 on every token; a shard
    without the record leaves it unknown, so not."""
    name = signal_name(signal)
    return bool(extents) and all(e is not None and e.get(name) == 0 for e in extents)


# ---- the records ------------------------------------------------------------------------------------


class RecordMismatch(UserError):
    """A record whose keys are not this treg's: written by another version."""


class Record:
    """A dataclass written as a JSON object and read back key by key."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str):
        """The record in `data`; a missing or unknown key is named in one line, with `where` it was read."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object for its {cls.__name__}, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing, unknown = [n for n in names if n not in data], sorted(set(data) - set(names))
        if missing or unknown:
            found = (f"lacks {missing}" if missing else "") + (" and " if missing and unknown else "") + (
                f"has unknown {unknown}" if unknown else "")
            raise RecordMismatch(f"{where}: its {cls.__name__} {found}; it was written by another version of treg: "
                                 "score the data again with this one")
        hints = typing.get_type_hints(cls)
        return cls(**{n: hints[n].from_dict(data[n], where) if is_dataclass(hints[n]) else data[n] for n in names})


@dataclass(frozen=True)
class Provenance(Record):
    """Everything that decides a scored folder's content; a rerun with any of it different is refused."""

    model: str
    model_revision: str | None
    scorer_model: str
    dpo_model: str | None  # not None: the shards hold the --dpo-model COLUMNS
    reverse_dpo_model: str | None  # not None: the shards hold the --reverse-dpo-model COLUMNS
    ref_topk: int  # K > 0: the shards hold the --ref-topk COLUMNS, K values per response token; 0: none
    ce_scores: bool  # the shards hold the --ce-scores COLUMNS (of dpo_model and reverse_dpo_model)
    tokenizer_hash: str  # tokenizer_fingerprint of --model's tokenizer
    dataset: str
    dataset_config: str | None
    input_fingerprint: str
    split: str
    columns: dict
    token_rewards: str  # "contrastive" (the revision prompts' r̂) or "edit-diff" (no REVISION_COLUMNS)
    revision_prompts: dict  # empty under edit-diff
    reward_transform: str
    max_length: int
    max_prompt_length: int
    max_model_len: int
    backend: str
    dtype: str
    num_workers: int
    shard_size: int
    treg_version: str

    IGNORED = ("treg_version",)  # may differ between compatible runs

    def differences(self, other: Provenance) -> list[str]:
        ours, theirs = self.to_dict(), other.to_dict()
        return sorted(name for name in ours if name not in self.IGNORED and ours[name] != theirs[name])

    @property
    def schema(self) -> pa.Schema:
        """The schema of shards written with this provenance."""
        return shard_schema(dpo=self.dpo_model is not None, reverse_dpo=self.reverse_dpo_model is not None,
                            revision=self.token_rewards == "contrastive", topk=self.ref_topk > 0,
                            ce=self.ce_scores)

    @property
    def column_names(self) -> tuple[str, ...]:
        """The per-token columns (COLUMNS' names) its shards hold, per side."""
        return tuple(name.removeprefix(column(SIDES[0], "")) for name in self.schema.names
                     if name.startswith(column(SIDES[0], "")))


@dataclass(frozen=True)
class ShardInfo(Record):
    """What one shard covers: input rows [input_start, input_end), skips included."""

    input_start: int
    input_end: int
    rows: int
    tokens: int
    skipped: list  # {"id", "reason", "detail"} of the input rows skipped in that range


@dataclass(frozen=True)
class ShardMetadata(Record):
    """A shard's Parquet metadata (key METADATA_KEY)."""

    provenance: Provenance
    shard: ShardInfo


@dataclass(frozen=True)
class WorkerManifest(Record):
    """A finished worker's part of the input and of the folder."""

    provenance: Provenance
    worker_index: int
    input_start: int
    input_end: int
    shards: list  # file names in data/, in order
    rows: int
    tokens: int
    skipped: list
    scoring_path: str
    reward_check: dict | None  # treg-probe's result on the shipped pairs at the start; None when not run


@dataclass(frozen=True)
class Counts(Record):
    pairs_read: int
    pairs_scored: int
    pairs_skipped: int
    skipped_by_reason: dict
    tokens: int


@dataclass(frozen=True)
class Manifest(Record):
    """A finished folder: written once every worker has finished, so its presence means complete."""

    format: str
    provenance: Provenance
    counts: Counts
    shards: list  # paths relative to the folder: data/<shard name>
    skipped_examples: list
    scoring_path: list
    reward_check: dict | None  # the first worker's with one (every worker measures the same)


def read_shard_metadata(path: str | Path) -> ShardMetadata:
    with reading_shard(path):
        metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise UserError(f"{path} is not a treg shard (no '{METADATA_KEY.decode()}' metadata)")
    return ShardMetadata.from_dict(json.loads(metadata[METADATA_KEY]), str(path))


@contextmanager
def reading_shard(path: str | Path):
    """pyarrow's errors while the block reads the shard `path` (damaged, cut short, or unreadable) as one line naming
    it."""
    try:
        yield
    except (OSError, pa.ArrowInvalid) as err:
        raise unreadable(path, err, "score the data again (treg-score --overwrite), or remove that shard") from None


def open_shard(path: str | Path) -> pq.ParquetFile:
    """A shard to read, its pages checked against the checksums treg-score writes with them: a damaged page is an
    error, not wrong numbers (a shard written without checksums is read unchecked)."""
    with reading_shard(path):
        return pq.ParquetFile(path, page_checksum_verification=True)


def check_column_types(path: str | Path, schema: pa.Schema, names: list[str]) -> None:
    """The columns `names` of a shard hold what the readers take (token ids: lists of integers; per-token values:
    lists of floats; top-k columns: lists of such lists; texts: strings; messages: lists of structs), or one line
    naming the first that does not."""
    expected = shard_schema(dpo=True, reverse_dpo=True, topk=True, ce=True)
    for name in names:
        if name in schema.names and name in expected.names:
            found, wanted = schema.field(name).type, expected.field(name).type
            if _kind(found) != _kind(wanted):
                raise UserError(f"{path}: its column {name} is {found}, where treg-score writes {wanted}; score the "
                                "data again with treg-score")


def _kind(arrow_type: pa.DataType) -> str:
    """A type as the readers rely on it, whatever its width: 32 or 64-bit numbers and offsets read alike; a list of
    lists (the top-k columns) is "list of list of ...", so a flat list is not taken for one."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"list of {_kind(arrow_type.value_type)}"
    kinds = {"integer": pa.types.is_integer, "float": pa.types.is_floating, "struct": pa.types.is_struct,
             "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)}
    return next((kind for kind, test in kinds.items() if test(arrow_type)), str(arrow_type))


def read_worker_manifest(path: Path) -> WorkerManifest:
    return WorkerManifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


def started_scoring(root: Path) -> bool:
    """treg-score marked the folder as its own (a worker that has written no shard yet)."""
    return owned_by(root, "treg-score")


def read_manifest(folder: str | Path) -> Manifest:
    """The Manifest of a finished folder (given it or its data/ folder)."""
    root = output_root(folder)
    path = root / MANIFEST
    if not path.is_file():
        finished = len(list((root / MANIFESTS_DIR).glob(WORKER_MANIFEST_GLOB)))
        shards = sorted((root / DATA_DIR).glob(SHARD_GLOB))
        if not shards and not finished and not started_scoring(root):  # no scoring to finish
            raise UserError(f"{root} is not a treg-score output (no manifest.json, no shards); give the folder "
                            "treg-score wrote")
        workers = read_shard_metadata(shards[0]).provenance.num_workers if shards else "?"
        raise UserError(f"{root} is not a finished treg-score output: no manifest.json ({finished} of {workers} "
                        "workers finished); rerun the treg-score command(s) to finish scoring it, every worker")
    return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))


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
