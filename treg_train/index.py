"""A scored folder as training sees it: its row groups, checked, and the pairs read out of them.

Nothing unchecked enters training: the folder must be a finished treg-score output (its manifest lists
exactly the shards found), a token weighting's signal must not be 0 on every token (`check_signal`), and each
row group is checked for NaN, Inf and list lengths as it is read.

--eval-fraction holds pairs out by a hash of their coordinates (`held_out_rows`), so the split needs
no row content: an index of one side of the split lists only that side's rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from treg_core.contract import (
    COLUMN_RANGES,
    COLUMNS,
    SIDES,
    SIGNALS,
    Provenance,
    check_column_types,
    column,
    missing_column_advice,
    open_shard,
    output_root,
    read_manifest,
    read_shard_metadata,
    reading_shard,
    recorded_zero,
    shard_files,
    side_columns,
    signal_extents,
    zero_signals,
)
from treg_core.errors import UserError, first_line
from treg_core.sources import is_hub_id

TOPK_COLUMNS = tuple(n for n, c in COLUMNS.items() if c.written_with == "--ref-topk")  # K values per token


@dataclass
class TrainingPair:
    """One pair's token data as NumPy arrays (copies: they outlive the row group they were read from)."""

    id: str
    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    chosen_ref_logps: np.ndarray | None
    rejected_ref_logps: np.ndarray | None
    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    chosen_signal: np.ndarray | None = None  # Reading.signal's s_t
    rejected_signal: np.ndarray | None = None
    chosen_ref_topk_ids: np.ndarray | None = None  # [tokens, K], with Reading.ref_topk
    rejected_ref_topk_ids: np.ndarray | None = None
    chosen_ref_topk_logps: np.ndarray | None = None
    rejected_ref_topk_logps: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of [prompt + chosen; prompt + rejected]."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def longest(self) -> int:
        """Tokens of its longer sequence, prompt + the longer response: what --max-length bounds."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def cut_to_one_token(self) -> TrainingPair:
        """One token of prompt and of each response: the cheapest forward, for a dummy micro-batch."""
        arrays = [getattr(self, f.name) for f in fields(self) if f.name != "id"]
        return TrainingPair(self.id, *(None if values is None else values[:1] for values in arrays))


@dataclass(frozen=True)
class Reading:
    """What training reads of each pair besides its token ids."""

    reward_column: str = "rewards"  # r̂
    ref_logps: bool = True  # the reference log-probs (not needed with an online reference model)
    signal: tuple[str, ...] | None = None  # s_t = first − second (or a column's value), of a token weighting
    swap: bool = False  # chosen and rejected exchanged (treg-train --swap-pairs)
    ref_topk: bool = False  # the reference's top-K tokens and log-probs at each position (TDPO without --ref-model)

    def side_names(self) -> tuple[str, ...]:
        return (("ids", self.reward_column) + (("ref_logps",) if self.ref_logps else ()) + (self.signal or ())
                + (TOPK_COLUMNS if self.ref_topk else ()))


def resolve_shards(data: str, flag: str = "--data") -> tuple[Path, list[Path]]:
    """The treg-score output folder and its Parquet files, for that folder, its data/ folder, or a
    Hub dataset id."""
    path = Path(data)
    if not path.exists():
        if not is_hub_id(data):
            raise UserError(f"{flag} {data} is neither a folder nor a Hub dataset id (ORG/NAME)")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=data, repo_type="dataset", allow_patterns=["*.parquet", "*.json"]))
        except Exception as err:  # network, auth, missing repo: one line for the user
            raise UserError(f"cannot download dataset {data!r}: {first_line(err)}") from None
    return output_root(path), shard_files(path)


def check_complete(root: Path, files: list[Path], num_pairs: int) -> None:
    """Train only on a finished treg-score output: its manifest lists exactly these shards and rows."""
    manifest = read_manifest(root)
    listed = sorted(Path(name).name for name in manifest.shards)
    scored = manifest.counts.pairs_scored
    if listed != [f.name for f in files] or scored != num_pairs:
        raise UserError(f"{root}: the shards there ({len(files)} files, {num_pairs} pairs) "
                        f"are not those its manifest.json lists ({len(listed)} files, {scored} pairs); "
                        "the folder changed after scoring: score it again")


def check_numbers(table: pa.Table, where: str) -> None:
    """Every per-token list has one finite value per token: NaN or Inf would train a NaN model."""
    ids = table.column("id").to_pylist()
    for side in SIDES:
        tokens = pc.list_value_length(table.column(column(side, "ids"))).to_numpy(zero_copy_only=False)
        for name in table.column_names:
            if not name.startswith(column(side, "")) or name == column(side, "ids"):
                continue
            values = table.column(name).combine_chunks()
            lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
            if (lengths != tokens).any():
                row = int(np.argmax(lengths != tokens))
                raise UserError(f"{where}: pair {ids[row]}: {name} has {lengths[row]} values for {tokens[row]} tokens")
            inner, parents = values.flatten(), pc.list_parent_indices(values).to_numpy()
            if pa.types.is_list(inner.type):  # K values per token: the reference's top-K
                widths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
                if len(widths) and (widths[0] == 0 or (widths != widths[0]).any()):
                    row = parents[int(np.argmax(widths != widths[0])) if widths[0] else 0]
                    raise UserError(f"{where}: pair {ids[row]}: {name} does not hold the same number (at least 1) "
                                    "of values for every token; score the data again or drop that pair")
                inner, parents = inner.flatten(), parents[pc.list_parent_indices(inner).to_numpy()]
            flat = inner.to_numpy(zero_copy_only=False)
            finite = np.isfinite(flat)
            if not finite.all():
                row = parents[np.argmin(finite)]
                raise UserError(f"{where}: pair {ids[row]}: {name} holds NaN or infinite values; "
                                "score the data again or drop that pair")
            low, high = COLUMN_RANGES.get(name.removeprefix(column(side, "")), (-np.inf, np.inf))
            outside = (flat < low) | (flat > high)
            if outside.any():
                first = int(np.argmax(outside))
                row = parents[first]
                raise UserError(f"{where}: pair {ids[row]}: {name} holds {flat[first]:.6g}, outside its range "
                                f"[{low:g}, {high:g}]; score the data again or drop that pair")


def check_signal(root: Path, signal: tuple[str, str] | None, provenance: Provenance,
                 extents: list[dict | None]) -> None:
    """A token weighting's signal that is 0 on every token would weigh every token alike, so it is refused: known
    from the models that scored its two columns, or from every shard's record of it (a shard without one: unknown)."""
    if signal is None:
        return
    by_models = signal in zero_signals(provenance.scorer_model, provenance.model_revision, provenance.dpo_model,
                                       provenance.reverse_dpo_model)
    if by_models or recorded_zero(signal, extents):
        why = f"both are log-probs of {provenance.dpo_model}" if by_models else "as every shard records"
        raise UserError(f"{root}: *_{signal[0]} - *_{signal[1]}, the token signal this weighting reads, is 0 on "
                        f"every token ({why}); score the data again with {SIGNALS[signal].needs}")


def held_out_rows(file_name: str, row_group: int, rows: int, fraction: float) -> np.ndarray:
    """Which rows of a row group --eval-fraction holds out: those whose hash of (shard file name, row group, row)
    falls below `fraction`. Nothing is read, so memory stays flat; the split is the same on every rank, on resume
    and for every --seed (runs with other seeds are evaluated on the same pairs); a larger fraction holds out a
    superset."""
    key = int.from_bytes(hashlib.blake2b(f"{file_name}/{row_group}".encode(), digest_size=8).digest(), "little")
    x = np.uint64(key) + np.arange(rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's mixer: uniform 64-bit values
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


class ShardIndex:
    """A scored folder's row groups and the rows of each, or with `holdout` one side of the --eval-fraction
    split: the pairs kept for training, or with `held_out` the ones held out for evaluation. Row r of row
    group g is row `first_row[g] + r` of the whole folder. Reads nothing but metadata until asked."""

    def __init__(self, data: str, reading: Reading = Reading(), holdout: float = 0.0, held_out: bool = False,
                 flag: str = "--data"):
        root, self.files = resolve_shards(data, flag)
        self.holdout, self.held_out, self.reading = holdout, held_out, reading
        per_side = tuple(dict.fromkeys(reading.side_names()))
        self.columns = ["id", "prompt_ids"] + [name for side in SIDES for name in side_columns(side, per_side)]
        self.groups: list[tuple[int, int, int]] = []  # (file index, row group, rows)
        self.recorded_signals: list[dict | None] = []  # each shard's signal_extents
        provenances = [self._add_file(index, file) for index, file in enumerate(self.files)]
        if len({p.tokenizer_hash for p in provenances}) != 1:
            raise UserError("the shards were scored with different tokenizers; train on one scored dataset at a time")
        self.provenance = provenances[0]
        self.tokenizer_hash = self.provenance.tokenizer_hash
        self.first_row = np.cumsum([0] + [rows for *_, rows in self.groups])
        total = int(self.first_row[-1])
        check_complete(root, self.files, total)
        check_signal(root, reading.signal, self.provenance, self.recorded_signals)
        self.num_pairs = sum(len(self.rows(g)) for g in range(len(self.groups))) if holdout else total
        self.groups_read = 0  # row groups read so far
        self._tokens: np.ndarray | None = None  # tokens_by_row, kept once counted

    def _add_file(self, index: int, file: Path):
        meta, parquet = read_shard_metadata(file), open_shard(file)
        missing = [c for c in self.columns if c not in parquet.schema_arrow.names]
        if missing:
            raise UserError(f"{file} lacks the column(s) {missing}; {missing_column_advice(missing)}")
        check_column_types(file, parquet.schema_arrow, self.columns)
        self.groups += [(index, g, parquet.metadata.row_group(g).num_rows) for g in range(parquet.num_row_groups)]
        self.recorded_signals.append(signal_extents(parquet.schema_arrow))
        return meta.provenance

    @property
    def total_rows(self) -> int:
        """Rows of the whole folder, both sides of a split."""
        return int(self.first_row[-1])

    def rows(self, group: int) -> range | list[int]:
        """The rows of a row group on this index's side of the split (all of them without one)."""
        file_index, row_group, rows = self.groups[group]
        if not self.holdout:
            return range(rows)
        held = held_out_rows(self.files[file_index].name, row_group, rows, self.holdout)
        return np.flatnonzero(held == self.held_out).tolist()

    def table(self, group: int) -> pa.Table:
        """A row group's columns, checked."""
        file_index, row_group, _ = self.groups[group]
        with reading_shard(self.files[file_index]):
            table = open_shard(self.files[file_index]).read_row_group(row_group, columns=self.columns).combine_chunks()
        check_numbers(table, f"{self.files[file_index]} (row group {row_group})")
        self.groups_read += 1
        return table

    def pair_lengths(self) -> np.ndarray:
        """Each pair's (prompt, chosen, rejected) token counts on this index's side of the split, [pairs, 3], in
        storage order, for the memory plan; `tokens_by_row` keeps their sums."""
        groups = list(self._lengths_by_group())
        self._tokens = _trained_tokens(groups, self.total_rows)
        return np.concatenate([lengths for _, lengths in groups]) if groups else np.zeros((0, 3), dtype=np.int64)

    def tokens_by_row(self) -> np.ndarray:
        """The tokens each row of the whole folder trains, [prompt; chosen] and [prompt; rejected] (0 off this
        index's side of the split), by its number in the folder: what a global batch's split balances. 4 bytes a
        row, counted once (by `pair_lengths` where the memory plan read them)."""
        if self._tokens is None:
            self._tokens = _trained_tokens(self._lengths_by_group(), self.total_rows)
        return self._tokens

    def _lengths_by_group(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(the folder's numbers of a row group's rows on this side of the split, their (prompt, chosen, rejected)
        token counts) for each row group that has any. The shards record no lengths, so the three token-id columns
        are read, row group by row group (no other column, nothing kept but the counts)."""
        names, shard = ["prompt_ids", column(SIDES[0], "ids"), column(SIDES[1], "ids")], (None, None)
        for group, (file_index, row_group, _) in enumerate(self.groups):
            rows, file = np.asarray(self.rows(group), dtype=np.int64), self.files[file_index]
            if not len(rows):
                continue
            if shard[0] != file_index:  # one shard open at a time: at 1M pairs, 72 MB of RSS against 180 MB
                shard = file_index, open_shard(file)
            with reading_shard(file):  # one thread: threads' allocations stay in the process after them
                table = shard[1].read_row_group(row_group, columns=names, use_threads=False)
            lengths = [pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False) for name in names]
            yield self.first_row[group] + rows, np.stack(lengths, axis=1)[rows]

    def check_every_group(self) -> None:
        """Read and check every row group on this index's side of the split now, rather than when it is reached:
        for held-out pairs, which are read only when the run evaluates, after its steps."""
        for group in range(len(self.groups)):
            if len(self.rows(group)):
                self.table(group)

    def pairs(self, table: pa.Table, rows) -> list[TrainingPair]:
        """Rows of a row group's table, their arrays copied so that the table can be dropped."""

        def lists(name: str) -> list:
            if name not in table.column_names:
                return [None] * len(rows)
            array = table.column(name).combine_chunks()
            offsets, values = array.offsets.to_numpy(), pc.list_flatten(array)
            if pa.types.is_list(values.type):  # one list of K per token: [tokens, K] rows
                width = pc.list_value_length(values)[0].as_py() if len(values) else 1
                values = pc.list_flatten(values).to_numpy(zero_copy_only=False).reshape(-1, width)
            else:
                values = values.to_numpy(zero_copy_only=False)
            return [values[offsets[row]:offsets[row + 1]].copy() for row in rows]

        sides = SIDES[::-1] if self.reading.swap else SIDES  # the order TrainingPair's chosen, rejected are read in

        def per_side(name: str) -> list:
            return [lists(column(side, name)) for side in sides]

        absent = [[None] * len(rows)] * 2  # a column not read, for both sides
        signal = absent
        if self.reading.signal and len(self.reading.signal) == 1:  # a column's own values
            signal = per_side(self.reading.signal[0])
        elif self.reading.signal:
            first, second = self.reading.signal
            signal = [[a - b for a, b in zip(*pair)] for pair in zip(per_side(first), per_side(second))]
        topk = [per_side(name) for name in TOPK_COLUMNS] if self.reading.ref_topk else [absent, absent]
        arrays = [lists("prompt_ids"), *per_side("ids"), *per_side("ref_logps"), *per_side(self.reading.reward_column),
                  *signal, *topk[0], *topk[1]]
        ids = table.column("id").take(rows).to_pylist()
        return [TrainingPair(id, *values) for id, *values in zip(ids, *arrays)]


def _trained_tokens(groups: Iterable[tuple[np.ndarray, np.ndarray]], total_rows: int) -> np.ndarray:
    """Each row's [prompt; chosen] and [prompt; rejected] tokens, from ShardIndex._lengths_by_group."""
    tokens = np.zeros(total_rows, dtype=np.int32)
    for numbers, lengths in groups:
        tokens[numbers] = 2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]
    return tokens
