"""Stream scored shards: a deterministic global order, global batches, each rank's slice.

Memory stays flat in dataset size. The order is built from row-group sizes alone (a seeded permutation of
row groups, then a shuffle buffer), and each epoch runs it twice: over row coordinates, to mark the rows
this rank trains on (a byte per row), then over row content. That pass reads a row group only if it holds
a marked row, once, when the order reaches it; the marked rows go into the shuffle buffer as copies, the
others as None (so the order is the same on every rank), and the group's table is dropped. The position
in the stream is a number of global batches, so resuming just regenerates the order and skips ahead,
reading nothing for the batches skipped.

--eval-fraction holds pairs out by a hash of their coordinates (`held_out_rows`), so the split
needs no row content either; the training side leaves them out of its order and its count.

Nothing unchecked enters training: the folder must be a finished treg-score output (its manifest
lists exactly the shards found), and each row group is checked for NaN, Inf and list lengths as
it is read.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from treg_data.contract import MANIFEST, SIDES, column, output_root, read_shard_metadata, shard_files, side_columns
from treg_data.errors import UserError, first_line


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

    @property
    def num_tokens(self) -> int:
        """Tokens of [prompt + chosen; prompt + rejected]."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    def cut_to_one_token(self) -> TrainingPair:
        """One token of prompt and of each response: the cheapest forward, for a dummy micro-batch."""
        return TrainingPair(self.id, *(None if values is None else values[:1] for values in (
            self.prompt_ids, self.chosen_ids, self.rejected_ids, self.chosen_ref_logps, self.rejected_ref_logps,
            self.chosen_rewards, self.rejected_rewards)))


def resolve_shards(data: str) -> tuple[Path, list[Path]]:
    """The treg-score output folder and its Parquet files, for that folder, its data/ folder, or a
    Hub dataset id."""
    path = Path(data)
    if not path.exists():
        if data.startswith((".", "/", "~")) or data.count("/") != 1:
            raise UserError(f"--data {data} is neither a folder nor a Hub dataset id (ORG/NAME)")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=data, repo_type="dataset", allow_patterns=["*.parquet", "*.json"]))
        except Exception as err:  # network, auth, missing repo: one line for the user
            raise UserError(f"cannot download dataset {data!r}: {first_line(err)}") from None
    return output_root(path), shard_files(path)


def check_complete(root: Path, files: list[Path], num_pairs: int, provenance: dict) -> None:
    """Train only on a finished treg-score output: its manifest lists exactly these shards and rows."""
    if not (root / MANIFEST).is_file():
        finished = len(list((root / "manifests").glob("worker-*.json")))
        raise UserError(f"{root} is not a finished treg-score output: no manifest.json ({finished} of "
                        f"{provenance.get('num_workers', '?')} workers finished); "
                        "rerun the treg-score command(s) to finish it")
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    listed = sorted(Path(name).name for name in manifest.get("shards", []))
    scored = manifest.get("counts", {}).get("pairs_scored")
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
            finite = np.isfinite(values.flatten().to_numpy(zero_copy_only=False))
            if not finite.all():
                row = pc.list_parent_indices(values).to_numpy()[np.argmin(finite)]
                raise UserError(f"{where}: pair {ids[row]}: {name} holds NaN or infinite values; "
                                "score the data again or drop that pair")


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


class ShardDataset:
    """A scored folder's pairs, or with `holdout` one side of the --eval-fraction split: the pairs kept for
    training, or with `held_out` the ones held out for evaluation."""

    def __init__(self, data: str, reward_column: str = "rewards", with_ref_logps: bool = True,
                 holdout: float = 0.0, held_out: bool = False):
        root, self.files = resolve_shards(data)
        self.holdout, self.held_out = holdout, held_out
        per_side = ("ids", reward_column) + (("ref_logps",) if with_ref_logps else ())
        self.columns = ["id", "prompt_ids"] + [name for side in SIDES for name in side_columns(side, per_side)]
        self.reward_column, self.with_ref_logps = reward_column, with_ref_logps
        self.groups: list[tuple[int, int, int]] = []  # (file index, row group, rows)
        hashes = set()
        for index, file in enumerate(self.files):
            try:
                meta, parquet = read_shard_metadata(file), pq.ParquetFile(file)
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"{file} is not a readable Parquet shard: {first_line(err)}") from None
            missing = [c for c in self.columns if c not in parquet.schema_arrow.names]
            if missing:
                raise UserError(f"{file} lacks the column(s) {missing}; was it written by treg-score?")
            hashes.add(meta["provenance"]["tokenizer_hash"])
            self.groups += [(index, g, parquet.metadata.row_group(g).num_rows) for g in range(parquet.num_row_groups)]
        if len(hashes) != 1:
            raise UserError("the shards were scored with different tokenizers; train on one scored dataset at a time")
        self.tokenizer_hash = hashes.pop()
        self.provenance = read_shard_metadata(self.files[0])["provenance"]
        # Row r of group g is row first_row[g] + r of the whole dataset; the last entry is the total.
        self.first_row = np.cumsum([0] + [rows for *_, rows in self.groups])
        total = int(self.first_row[-1])
        check_complete(root, self.files, total, self.provenance)
        self.num_pairs = sum(len(self.rows(g)) for g in range(len(self.groups))) if holdout else total
        self.groups_read = 0  # row groups read so far
        self._last: tuple[int, pa.Table] | None = None  # the row group `read` read last

    def order(self, seed: int, epoch: int, buffer_size: int) -> Iterator[tuple[int, int]]:
        """Every (row group, row) once, in a shuffled order fixed by (seed, epoch)."""
        return self._shuffled(seed, epoch, buffer_size, lambda group: [(group, row) for row in self.rows(group)])

    def pairs(self, seed: int, epoch: int, buffer_size: int, marked: np.ndarray) -> Iterator[TrainingPair | None]:
        """The rows of `order`, in that order: a TrainingPair for each row marked in `marked` (one bool per row
        of the dataset, see `first_row`), None for the others. A row group is read only if it holds a marked
        row, once, when the order reaches it."""
        return self._shuffled(seed, epoch, buffer_size, lambda group: self._marked_pairs(group, marked))

    def _shuffled(self, seed: int, epoch: int, buffer_size: int, items: Callable[[int], list]) -> Iterator:
        """A row group's items (one per row on this side of the split) in the shuffled order. The random draws
        depend on the row counts alone, so every kind of item comes in the same order; a group's items are
        made when the order reaches it and only the shuffle buffer keeps them."""
        rng = random.Random(f"{seed}-{epoch}")
        group_order = list(range(len(self.groups)))
        rng.shuffle(group_order)
        buffer: list = []
        for group in group_order:
            for item in items(group):
                if len(buffer) < buffer_size:
                    buffer.append(item)
                    continue
                pick = rng.randrange(buffer_size)
                yield buffer[pick]
                buffer[pick] = item
        rng.shuffle(buffer)
        yield from buffer

    def rows(self, group: int) -> range | list[int]:
        """The rows of a row group on this dataset's side of the split (all of them without one)."""
        file_index, row_group, rows = self.groups[group]
        if not self.holdout:
            return range(rows)
        held = held_out_rows(self.files[file_index].name, row_group, rows, self.holdout)
        return np.flatnonzero(held == self.held_out).tolist()

    def coordinates(self) -> Iterator[tuple[int, int]]:
        """Every (row group, row) once in storage order: the evaluation's order, which needs no shuffle."""
        for group in range(len(self.groups)):
            for row in self.rows(group):
                yield group, row

    def read(self, group: int, row: int) -> TrainingPair:
        """One pair. The last row group read is kept, so reading in storage order reads each group once."""
        if self._last is None or self._last[0] != group:
            self._last = None  # drop the old table before reading the new one
            self._last = group, self._table(group)
        return self._pairs(self._last[1], [row])[0]

    def _marked_pairs(self, group: int, marked: np.ndarray) -> list[TrainingPair | None]:
        """A row group's rows on this side of the split: a TrainingPair if marked, None if not."""
        rows = np.asarray(self.rows(group), dtype=np.int64)
        mine = marked[self.first_row[group] + rows]
        if not mine.any():
            return [None] * len(rows)
        pairs = iter(self._pairs(self._table(group), rows[mine]))
        return [next(pairs) if m else None for m in mine]

    def _pairs(self, table: pa.Table, rows) -> list[TrainingPair]:
        """Rows of a row group's table, their arrays copied so that the table can be dropped."""

        def lists(name: str) -> list:
            if name not in table.column_names:
                return [None] * len(rows)
            array = table.column(name).combine_chunks()
            offsets, values = array.offsets.to_numpy(), array.values.to_numpy(zero_copy_only=False)
            return [values[offsets[row]:offsets[row + 1]].copy() for row in rows]

        names = ["prompt_ids", column("chosen", "ids"), column("rejected", "ids"), column("chosen", "ref_logps"),
                 column("rejected", "ref_logps"), column("chosen", self.reward_column),
                 column("rejected", self.reward_column)]
        ids = table.column("id").take(rows).to_pylist()
        return [TrainingPair(id, *arrays) for id, *arrays in zip(ids, *map(lists, names))]

    def _table(self, group: int) -> pa.Table:
        file_index, row_group, _ = self.groups[group]
        table = pq.ParquetFile(self.files[file_index]).read_row_group(row_group, columns=self.columns).combine_chunks()
        check_numbers(table, f"{self.files[file_index]} (row group {row_group})")
        self.groups_read += 1
        return table


def global_batches(dataset: ShardDataset, seed: int, global_batch_size: int, buffer_size: int,
                   start_batch: int = 0, rank: int = 0,
                   world_size: int = 1) -> Iterator[tuple[int, int, list[TrainingPair]]]:
    """(epoch, batch index within the epoch, this rank's pairs of that global batch) forever; incomplete last
    batches are dropped, so every global batch has exactly global_batch_size pairs. The batches are the same
    for every world size: only the share each rank reads differs."""
    per_epoch = dataset.num_pairs // global_batch_size
    if per_epoch == 0:
        raise UserError(f"{dataset.num_pairs} pairs are fewer than --global-batch-size {global_batch_size}")
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        marked = rows_of_rank(dataset, seed, epoch, buffer_size, global_batch_size, skip, rank, world_size)
        pairs = dataset.pairs(seed, epoch, buffer_size, marked)
        for index, batch in enumerate(_cut(pairs, global_batch_size, per_epoch)):
            if index >= skip:
                yield epoch, index, rank_slice(batch, rank, world_size)
        epoch, skip = epoch + 1, 0


def rows_of_rank(dataset: ShardDataset, seed: int, epoch: int, buffer_size: int, global_batch_size: int,
                 skip: int, rank: int, world_size: int) -> np.ndarray:
    """Which rows of the dataset (see `first_row`) this rank trains on in an epoch's global batches from
    `skip` on, one bool per row: a pass over the order's coordinates, which reads no row content."""
    marked = np.zeros(int(dataset.first_row[-1]), dtype=bool)
    batches = _cut(dataset.order(seed, epoch, buffer_size), global_batch_size, dataset.num_pairs // global_batch_size)
    for index, batch in enumerate(batches):
        if index >= skip:
            for group, row in rank_slice(batch, rank, world_size):
                marked[dataset.first_row[group] + row] = True
    return marked


def _cut(order: Iterator, size: int, count: int) -> Iterator[list]:
    """The first `count` batches of `size` items of `order`; the rest of it is dropped."""
    for _ in range(count):
        yield [next(order) for _ in range(size)]


def rank_slice(batch: list, rank: int, world_size: int) -> list:
    """This rank's disjoint share of a global batch."""
    return batch[rank::world_size]


def micro_batches(pairs: list[TrainingPair], max_tokens: int, padding_free: bool) -> list[list[TrainingPair]]:
    """Split pairs into forwards of at most max_tokens tokens ([chosen; rejected] together).
    Longest first; with padding every pair costs the longest sequence in its micro-batch."""
    ordered = sorted(pairs, key=lambda p: -max(len(p.chosen_ids), len(p.rejected_ids)) - len(p.prompt_ids))
    batches: list[list[TrainingPair]] = []
    current: list[TrainingPair] = []
    for pair in ordered:
        candidate = current + [pair]
        if padding_free:
            cost = sum(p.num_tokens for p in candidate)
        else:
            cost = 2 * len(candidate) * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                            for p in candidate)
        if current and cost > max_tokens:
            batches.append(current)
            candidate = [pair]
        current = candidate
    if current:
        batches.append(current)
    return batches
